"""Train teachers with SAELens's own trainer (issue 13's peer-trained teachers), saved by SAELens.

    .venv/bin/python bench/peer_teachers.py [--families relu jumprelu topk] [--tokens 2000000] [--out var/peer]
        [--dataset bbc-news] [--conventions legacy|saelens]

The activations are this project's (SmolLM2-135M, ``blocks.3.hook_resid_post``, the *train* split of
``--dataset`` by the same seeded document split the upgrade uses: default BBC News), extracted once to
``<out>/acts-layer<L>-seed<S>-<tokens>`` and shuffled into 4,096-row batches, several passes when ``--tokens``
exceeds the extraction. Context conventions (``--conventions``, :data:`CONVENTIONS`): ``legacy`` (default; the
BBC teachers of docs/results-saelens.md) = 128-token contexts without BOS, documents concatenated without a
separator, position 0 dropped; ``saelens`` = what SAELens's ``LanguageModelSAERunnerConfig`` does by default
(``context_size`` 128, ``prepend_bos=True``, ``sequence_separator_token="bos"``, ``seqpos_slice=(None,)``: every
position kept, the BOS included; ``exclude_special_tokens=False``), chunked by :func:`rsae.data.concat_and_chunk`
(tested token for token against SAELens's ``concat_and_batch_sequences``).

Everything else is SAELens 6: the training SAE classes (``StandardTrainingSAE`` with its decoder-norm-weighted L1
and ``apply_b_dec_to_input``, ``JumpReLUTrainingSAE`` with its step L0 loss and straight-through threshold estimator
and its default initial threshold 0.01, ``TopKTrainingSAE`` with AuxK), their initialisation, ``SAETrainer`` (Adam,
lr warm-up and decay, coefficient warm-up, dead-latent tracking), and ``save_inference_model`` plus
``sparsity.safetensors``. The runner (``LanguageModelSAETrainingRunner``) is not used because it loads the LM itself
through the hub; its ``_set_sae_metadata`` fields are written here.

Output: ``<out>/teacher-<family>[-seed<S>]/`` (``cfg.json``, ``sae_weights.safetensors``,
``sparsity.safetensors``, ``training.json`` with the settings, wall time and final training stats).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
DATASET = "bbc-news"
LAYER = 3
CTX = 128
EVAL_FRACTION = 0.2
BATCH = 4096
DEFAULT_TOKENS = 2_000_000
DEFAULT_DISTINCT = 400_000
CONVENTIONS: dict[str, dict[str, Any]] = {
    "legacy": {
        "context_size": CTX,
        "prepend_bos": False,
        "seqpos_slice": [1, None],
        "exclude_special_tokens": False,
        "sequence_separator_token": None,
        "disable_concat_sequences": False,
    },
    "saelens": {
        "context_size": CTX,
        "prepend_bos": True,
        "seqpos_slice": [None],
        "exclude_special_tokens": False,
        "sequence_separator_token": "bos",
        "disable_concat_sequences": False,
    },
}
"""Context conventions by name, as SAELens ``metadata`` keys. ``saelens``: the defaults of SAELens 6's
``LanguageModelSAERunnerConfig`` (``context_size`` set to 128 explicitly, as in its examples)."""
# Per family: SAELens training-SAE kwargs and the trainer's learning rate. Coefficients chosen so that the
# teachers land at L0 of a few tens of 2,304 latents, as the project's own teachers (docs/peer-teachers.md).
# JumpReLU: Anthropic's variant that SAELens offers (tanh sparsity loss, straight-through gradient to the
# pre-activations as well), since with the step loss the thresholds (starting at SAELens's default 0.01) move
# only through the kernel and a 2M-token run ended at L0 > 1,000 of 2,304 (measured at 100 steps: 1,047).
# Thresholds stay near their 0.01 start either way: tiny beside the pre-activations, as issue 13 describes.
FAMILY_CFG: dict[str, dict[str, Any]] = {
    "relu": {"sae": {"l1_coefficient": 5.0, "l1_warm_up_steps": 25}, "lr": 5e-4},
    "jumprelu": {
        "sae": {
            "l0_coefficient": 10.0,
            "l0_warm_up_steps": 25,
            "jumprelu_sparsity_loss_mode": "tanh",
            "jumprelu_ste_to_input": True,
        },
        "lr": 5e-4,
    },
    "topk": {"sae": {"k": 32}, "lr": 5e-4},
}


def conventions(name: str) -> Any:
    """The :class:`rsae.data.ContextConventions` of :data:`CONVENTIONS` ``name`` (checked as a teacher's)."""
    from rsae.data import resolve_conventions

    return resolve_conventions({}, CONVENTIONS[name])


def extract(out: Path, n_tokens: int, seed: int, dataset: str = DATASET, convention: str = "legacy") -> Path:
    """Extract ``n_tokens`` train-split activations of ``dataset`` with the conventions ``convention`` once (reused
    when the folder holds a finished manifest of the same data set and conventions).

    Raises:
        SystemExit: the folder holds another data set's or conventions' activations (use another ``--out``).
    """
    from rsae.activations import extract_activations
    from rsae.models import load_model

    conv = conventions(convention)
    folder = out / f"acts-layer{LAYER}-seed{seed}-{n_tokens}"
    if (folder / "manifest.json").is_file():
        man = json.loads((folder / "manifest.json").read_text())
        same = man.get("dataset") == dataset and {k: man["conventions"][k] for k in CONVENTIONS[convention]} == {
            k: conv.to_dict()[k] for k in CONVENTIONS[convention]
        }
        if not same:
            raise SystemExit(f"{folder} holds activations of {man.get('dataset')!r} with other conventions")
        return folder
    lm, tok = load_model(MODEL)
    tmp = folder.with_suffix(".partial")
    extract_activations(
        lm,
        tok,
        layer=LAYER,
        dataset=dataset,
        split="train",
        n_tokens=n_tokens,
        out_dir=tmp,
        eval_fraction=EVAL_FRACTION,
        seed=seed,
        shard_tokens=65_536,
        conventions=conv,
    )
    tmp.rename(folder)
    return folder


def batches(folder: Path, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled [4096, d_in] float32 batches forever (pass after pass over the extraction)."""
    from rsae.activations import ActivationStore

    return ActivationStore(folder).iter_batches(BATCH, seed=seed)


def training_sae(family: str, d_in: int, d_sae: int, b_dec: torch.Tensor) -> Any:
    """SAELens training SAE of ``family`` (float32, CPU), b_dec set to the activations' mean as SAELens's
    runner does for ``b_dec_init_method="mean"``."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    kw = {**common, **FAMILY_CFG[family]["sae"]}
    cls, cfg_cls = {
        "relu": (StandardTrainingSAE, StandardTrainingSAEConfig),
        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
    }[family]
    sae = cls(cfg_cls(**kw))
    with torch.no_grad():
        sae.b_dec.copy_(b_dec)
    return sae


def metadata(sae: Any, dataset: str = DATASET, convention: str = "legacy") -> None:
    """The fields SAELens's runner sets in ``_set_sae_metadata``, for the extraction's data set and conventions
    (:data:`CONVENTIONS`), so that an upgrade of the teacher takes them from its ``cfg.json``."""
    m = sae.cfg.metadata
    m.model_name = MODEL
    m.model_class_name = "AutoModelForCausalLM"
    m.hook_name = f"blocks.{LAYER}.hook_resid_post"
    m.dataset_path = dataset
    for key, value in CONVENTIONS[convention].items():
        setattr(m, key, tuple(value) if key == "seqpos_slice" else value)


def train(
    family: str,
    folder: Path,
    out: Path,
    tokens: int,
    d_sae: int,
    seed: int,
    dataset: str = DATASET,
    convention: str = "legacy",
) -> dict[str, Any]:
    """Train one teacher with ``SAETrainer`` for ``tokens`` rows of the extraction ``folder`` (of ``dataset`` with
    the conventions ``convention``, recorded in its metadata); save it; return its training record."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import save_file

    from rsae.activations import ActivationStore

    torch.manual_seed(seed)
    store = ActivationStore(folder)
    sae = training_sae(family, store.d_in, d_sae, store.load(65_536).mean(0))
    metadata(sae, dataset, convention)
    steps = -(-tokens // BATCH)  # at least ``tokens`` seen
    cfg = SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=FAMILY_CFG[family]["lr"],
        lr_end=FAMILY_CFG[family]["lr"] / 10,
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        device="cpu",
        dead_feature_window=steps // 4,
        feature_sampling_window=steps // 4,
    )
    t0 = time.time()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(folder, seed))
    sae = trainer.fit()
    wall = time.time() - t0
    dest = out / (f"teacher-{family}" if seed == 0 else f"teacher-{family}-seed{seed}")
    dest.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(dest))
    save_file({"sparsity": trainer.log_feature_sparsity}, str(dest / "sparsity.safetensors"))
    record = {
        "family": family,
        "trainer": "sae_lens.training.sae_trainer.SAETrainer",
        "sae_lens_version": _sae_lens_version(),
        "training_sae": type(sae).__name__,
        "sae_kwargs": FAMILY_CFG[family]["sae"],
        "lr": cfg.lr,
        "batch_size": BATCH,
        "steps": steps,
        "tokens_seen": steps * BATCH,
        "distinct_tokens": store.rows,
        "dataset": dataset,
        "conventions": convention,
        "context": CONVENTIONS[convention],
        "epochs": round(steps * BATCH / store.rows, 2),
        "d_in": store.d_in,
        "d_sae": d_sae,
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": round(steps * BATCH / wall, 1),
        "final_l0": sae.cfg.metadata.l0,
        "dead_latents": sae.cfg.metadata.num_dead_features,
    }
    (dest / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["jumprelu", "topk", "relu"], choices=sorted(FAMILY_CFG))
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens seen in training (>= 2M for issue 13)")
    ap.add_argument("--distinct-tokens", type=int, default=DEFAULT_DISTINCT, help="train-split tokens extracted")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "peer")
    ap.add_argument("--dataset", default=DATASET, help="settings.data.dataset form: bbc-news, a hub id or a path")
    ap.add_argument("--conventions", choices=sorted(CONVENTIONS), default="legacy", help="context conventions")
    a = ap.parse_args(argv)
    folder = extract(a.out, a.distinct_tokens, a.seed, a.dataset, a.conventions)
    for fam in a.families:
        rec = train(fam, folder, a.out, a.tokens, a.d_sae, a.seed, a.dataset, a.conventions)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

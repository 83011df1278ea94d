"""Issue 13: the upgrade's init reproduces a teacher that SAELens's own trainer produced, within 5% in MSE and
L0 on held-out tokens: a ``JumpReLUTrainingSAE`` with SAELens's default initial threshold (0.01, so the
thresholds stay tiny beside the pre-activations and many active entries lie far above them), trained by
``SAETrainer`` on real SmolLM2 activations and saved by SAELens. Without the gate's linear tail the same init
misses by far more (``docs/method.md``, "Outside the fitted interval")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsae.activations import ActivationStore, extract_activations
from rsae.config import UpgradeConfig
from rsae.models import load_model
from rsae.pipeline import run_upgrade

pytestmark = pytest.mark.slow

LAYER = 1
DATA = {"train_tokens": 4096, "eval_tokens": 2048, "ctx_len": 64}


@pytest.fixture(scope="module")
def saelens_jumprelu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 576 -> 256 JumpReLU trained for 40 steps of 512 rows by SAELens's SAETrainer; saved by SAELens."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    root = tmp_path_factory.mktemp("saelens-jumprelu")
    lm, tok = load_model("smollm2-135m")
    extract_activations(
        lm, tok, layer=LAYER, dataset="bbc-news", split="train", n_tokens=8192, out_dir=root / "acts", ctx_len=64
    )
    store = ActivationStore(root / "acts")
    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(
            d_in=576, d_sae=256, dtype="float32", device="cpu", l0_coefficient=2.0,
            jumprelu_sparsity_loss_mode="tanh", jumprelu_ste_to_input=True,
        )
    )  # fmt: skip
    with torch.no_grad():
        sae.b_dec.copy_(store.load().mean(0))
    cfg = SAETrainerConfig(
        total_training_samples=40 * 512, train_batch_size_samples=512, lr=1e-3, lr_end=1e-4, device="cpu"
    )
    sae = SAETrainer(cfg=cfg, sae=sae, data_provider=store.iter_batches(512, seed=0)).fit()
    m = sae.cfg.metadata
    m.model_name, m.hook_name, m.context_size = "smollm2-135m", f"blocks.{LAYER}.hook_resid_post", 64
    m.prepend_bos, m.seqpos_slice = False, (1, None)
    sae.save_inference_model(str(root / "teacher"))
    return root / "teacher"


def _init_report(teacher: Path, out: Path, work: Path, tail: str) -> dict:
    cfg = UpgradeConfig(
        layer=LAYER,
        teacher=str(teacher),
        data=DATA,
        remez={"tail": tail},
        calibrate={"tokens": 2048},
        finetune={"steps": 0, "control": False},
        eval={"ce_sequences": 0, "probe_ks": []},
    )
    run_upgrade(cfg, out, work_dir=work)
    return json.loads((out / "report.json").read_text())


def test_init_reproduces_a_saelens_trained_jumprelu_teacher(saelens_jumprelu: Path, tmp_path: Path):
    work = tmp_path / "work"
    report = _init_report(saelens_jumprelu, tmp_path / "linear", work, "linear")
    t, i = report["metrics"]["teacher"], report["metrics"]["rsae_init"]
    assert 5 < t["l0"] < 250  # a sparse teacher, not a dead or dense one
    assert abs(i["mse"] / t["mse"] - 1) < 0.05, (i["mse"], t["mse"])
    assert abs(i["l0"] / t["l0"] - 1) < 0.05, (i["l0"], t["l0"])
    # SAELens's tiny thresholds: the 99.9th percentile of h / theta over active entries is above 1 / 0.044, so
    # the data rule asked for a jump below what can be fitted and c sits at its lower clip
    assert report["remez"]["params"]["c"] == 0.04
    # The tail's effect on a teacher whose active entries run far past the fitted interval is measured on the
    # 2M-token SAELens teacher in docs/method.md (+58.7% -> +0.02%) and shown on tiny thresholds in
    # tests/core/test_rsae_penalty.py; this 40-step teacher has too few such entries to separate the two.

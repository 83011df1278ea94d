"""``rsae eval`` (the evaluation alone), ``rsae import`` (foreign teacher -> SAELens layout) and ``rsae upgrade
--json``, run through the ``rsae`` entry point in this process on the real SmolLM2-135M, layer 1, BBC News, at small
sizes (a few held-out sequences of 64 tokens):

- an upgrade's ``--json`` summary, then ``rsae eval`` of its teacher and of its RSAE artifact on the same settings
  reproduce the report's teacher and RSAE columns (same held-out split, conventions read from the RSAE's cfg);
- an exact (identity) SAE and a zero-decoder SAE bound the metrics: FVU 0, delta CE 0, loss recovered 1, KL 0 for
  the first; loss recovered 0 and delta CE = CE zero - CE clean for the second (the splice is the zero ablation);
- each foreign format imports to a folder that ``sae_lens.SAE.load_from_disk`` reads and that reconstructs the
  same real activations as the original; evaluating the original and the import gives the same numbers;
- bad input exits 2 with a message naming what is wrong.

The SAEs are not trained (PCA directions, the identity, the tiny writers of ``tests/support/teachers.py``): the
checks are equalities and bounds, which hold for any weights.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from rsae.activations import ResidualCapture
from rsae.cli import main
from rsae.data import iter_documents
from rsae.formats import load_teacher
from rsae.models import load_model
from rsae.saebench import CORE_EVAL_FILE, CoreEvalOutput
from rsae.saes import ReLUSAE
from support.teachers import D_IN, write_dictionary_learning, write_gemma_scope, write_sparsify

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
EVAL = {"data": {"eval_tokens": 256, "ctx_len": 64}, "eval": {"ce_sequences": 3, "batch_size": 3}}
UPGRADE = {
    "data": {"train_tokens": 1024, "eval_tokens": 256, "ctx_len": 64},
    "calibrate": {"steps": 5, "tokens": 512},
    "finetune": {"steps": 4, "batch_size": 128, "eval_every": 2, "control": False},
    "eval": {"ce_sequences": 3, "batch_size": 3, "probe_ks": []},
}
COMPARED = ("mse", "fvu", "l0", "ce_clean", "ce_spliced", "ce_zero", "delta_ce", "delta_ce_se", "loss_recovered", "kl")


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``rsae ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    """Real activations [n, 576] at block 1's output of SmolLM2-135M on 4 BBC documents x 64 tokens (position 0
    dropped)."""
    model, tok = load_model("smollm2-135m")
    rows = []
    with ResidualCapture(model, LAYER) as cap:
        for doc in itertools.islice(iter_documents("bbc-news"), 4):
            rows.append(cap.run(model, torch.tensor([tok(doc.text).input_ids[:65]]))[0, 1:])
    return torch.cat(rows)


def _signed(folder: Path, basis: torch.Tensor, b_dec: torch.Tensor, *, decoder: bool = True, **meta) -> Path:
    """A ReLU SAE in the SAELens layout whose latents are relu(+-(x - b_dec) . u) for the rows u of ``basis``
    [k, d_in] (orthonormal): x_hat = b_dec + the projection of x - b_dec on their span (``decoder`` False: a zero
    decoder and b_dec, so x_hat = 0)."""
    k = basis.shape[0]
    sae = ReLUSAE(D_IN, 2 * k, metadata={"model_name": "smollm2-135m", **meta})
    w = torch.cat([basis, -basis])
    with torch.no_grad():
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.W_dec.copy_(w if decoder else torch.zeros_like(w))
        sae.b_dec.copy_(b_dec if decoder else torch.zeros(D_IN))
    return sae.save(folder)


def _pca_teacher(folder: Path, acts: torch.Tensor, k: int = 48) -> Path:
    mean = acts.mean(0)
    _, _, vh = torch.linalg.svd(acts - mean, full_matrices=False)
    return _signed(folder, vh[:k], mean, hook_name=HOOK)


def _metrics_equal(got: dict, want: dict) -> None:
    for key in COMPARED:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert got["n_tokens"] == want["n_tokens"] and got["ce_tokens"] == want["ce_tokens"]


def test_eval_reproduces_the_upgrade_report_for_the_teacher_and_the_rsae(tmp_path: Path, acts: torch.Tensor) -> None:
    teacher = _pca_teacher(tmp_path / "teacher", acts)
    up = tmp_path / "up"
    code, out, err = cli(
        "upgrade", "--teacher", str(teacher), "--out", str(up), "--work-dir", str(tmp_path / "w"), "--json",
        "--settings", json.dumps(UPGRADE),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)  # stdout is one JSON object, nothing else
    report = json.loads((up / "report.json").read_text())
    assert summary["metrics"] == report["metrics"] and summary["out"] == str(up.resolve())
    assert {"cfg.json", "sae_weights.safetensors", "report.json", "report.html"} <= set(summary["artifacts"])
    assert all(Path(p).is_file() and Path(p).parent == up.resolve() for p in summary["artifacts"].values())
    assert set(summary["metrics"]) == {"teacher", "rsae_init", "rsae"}

    code, out, err = cli("eval", "--sae", str(teacher), "--json", "--settings", json.dumps(UPGRADE))
    assert code == 0, err
    res = json.loads(out)
    _metrics_equal(res["metrics"], report["metrics"]["teacher"])
    assert res["host"]["hook"] == HOOK and res["sae"]["class"] == "ReLUSAE" and res["files"] == {}

    # the RSAE artifact: no ctx_len given, the conventions come from its cfg.json
    settings = {"data": {"eval_tokens": 256}, "eval": {"ce_sequences": 3, "batch_size": 3}}
    code, out, err = cli("eval", "--sae", str(up), "--out", str(tmp_path / "ev"), "--settings", json.dumps(settings))
    assert code == 0, err
    assert "RationalSAE" in out and "delta CE" in out and str(tmp_path / "ev" / "eval.json") in out
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    _metrics_equal(res["metrics"], report["metrics"]["rsae"])
    conv = res["data"]["conventions"]
    assert conv["context_size"] == 64 and conv["sources"]["context_size"] == "teacher"
    assert res["sae"]["architecture"] == "rational" and res["sae"]["source"] is None
    core = CoreEvalOutput.model_validate_json((tmp_path / "ev" / CORE_EVAL_FILE).read_text())
    assert res["files"]["core"] == str((tmp_path / "ev" / CORE_EVAL_FILE).resolve())
    rq = core.eval_result_metrics.reconstruction_quality
    assert rq.explained_variance == pytest.approx(1 - res["metrics"]["fvu"], abs=1e-6)
    assert core.eval_result_metrics.sparsity.l0 == pytest.approx(res["metrics"]["l0"], rel=1e-6)
    assert len(core.eval_result_details) == res["sae"]["d_sae"]


def test_exact_and_zero_saes_bound_the_metrics(tmp_path: Path) -> None:
    work = str(tmp_path / "acts")  # shared: the second and third runs reuse the held-out activations
    exact = _signed(tmp_path / "exact", torch.eye(D_IN), torch.zeros(D_IN))
    code, out, err = cli("eval", "--sae", str(exact), "--layer", "1", "--work-dir", work, "--json",
                         "--settings", json.dumps(EVAL))  # fmt: skip
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert m["fvu"] < 1e-10 and m["l0"] == pytest.approx(D_IN, abs=1.0)
    assert abs(m["delta_ce"]) < 1e-4 and m["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and m["kl"] < 1e-4
    assert m["ce_zero"] > m["ce_clean"] + 1.0  # zeroing block 1's output hurts

    zero = _signed(tmp_path / "zero", torch.eye(D_IN)[:8], torch.zeros(D_IN), decoder=False, hook_name=HOOK)
    code, out, err = cli("eval", "--sae", str(zero), "--hook", HOOK, "--work-dir", work, "--json",
                         "--settings", json.dumps(EVAL))  # fmt: skip
    assert code == 0, err
    z = json.loads(out)["metrics"]
    assert z["fvu_about_zero"] == pytest.approx(1.0) and z["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert z["delta_ce"] == pytest.approx(z["ce_zero"] - z["ce_clean"], rel=1e-5)
    assert z["kl"] == pytest.approx(z["kl_zero"], rel=1e-4) and z["ce_clean"] == m["ce_clean"]

    # probes asked for: training rows are extracted; this BBC slice (one category) is too small for probes
    probes = {**EVAL, "eval": {**EVAL["eval"], "ce_sequences": 0, "probe_ks": [1], "probe_train_sequences": 16}}
    code, out, err = cli("eval", "--sae", str(zero), "--work-dir", work, "--json", "--settings", json.dumps(probes))
    assert code == 0, err
    res = json.loads(out)
    assert res["data"]["probe_train"]["rows"] == 16 * 63 and res["metrics"]["ce_clean"] is None
    assert res["probing"] is None and any("probing skipped" in n for n in res["notes"])


@pytest.mark.parametrize(
    "writer,fmt",
    [(write_gemma_scope, "gemma-scope"), (write_sparsify, "sparsify"), (write_dictionary_learning, "auto")],
)
def test_import_loads_in_saelens_and_reconstructs_the_same(tmp_path: Path, acts: torch.Tensor, writer, fmt) -> None:
    import sae_lens

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    writer(src)
    code, stdout, err = cli("import", "--src", str(src), "--out", str(out), "--format", fmt, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["out"] == str(out.resolve()) and sorted(p.name for p in out.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    original = load_teacher(src).sae
    assert info["source"]["format"] == original.metadata["source"]["format"]
    theirs = sae_lens.SAE.load_from_disk(str(out))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(acts), original.encode(acts), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(theirs(acts), original(acts), rtol=1e-5, atol=1e-3)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["source"]["files"] == original.metadata["source"]["files"]  # where it came from


def test_eval_of_a_foreign_format_equals_eval_of_its_import(tmp_path: Path) -> None:
    src, out, work = tmp_path / "gemma", tmp_path / "imported", str(tmp_path / "acts")
    src.mkdir()
    write_gemma_scope(src)
    code, stdout, err = cli("import", "--src", str(src), "--out", str(out))
    assert code == 0 and "gemma_scope" in stdout and "apply_b_dec_to_input=False" in stdout, err
    results = []
    for folder in (src, out):
        code, stdout, err = cli("eval", "--sae", str(folder), "--layer", "1", "--work-dir", work, "--json",
                                "--no-progress", "--settings", json.dumps(EVAL))  # fmt: skip
        assert code == 0, err
        results.append(json.loads(stdout))
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["sae"]["source"]["format"] == "gemma_scope" and results[0]["sae"]["class"] == "JumpReLUSAE"


def test_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    gemma, dl = tmp_path / "gemma", tmp_path / "dl"
    for folder, writer in ((gemma, write_gemma_scope), (dl, write_dictionary_learning)):
        folder.mkdir()
        writer(folder)
    settings = json.dumps(EVAL)
    cases = [
        (("eval", "--sae", str(gemma), "--settings", settings), "hook"),  # no site named anywhere
        (("eval", "--sae", str(dl), "--layer", "1", "--settings", settings), "layer"),  # its config says layer 3
        (("eval", "--sae", str(tmp_path / "none"), "--layer", "1"), "teacher"),
        (("eval", "--sae", str(gemma), "--layer", "1", "--settings", '{"eval": {"nope": 1}}'), "nope"),
        (("eval", "--sae", str(gemma), "--layer", "1", "--settings", "[1]"), "JSON object"),
        (("eval", "--sae", str(gemma), "--layer", "1", "--format", "sparsify"), "cfg.json"),
        (("import", "--src", str(gemma), "--out", str(tmp_path / "o"), "--format", "dictionary-learning"), "ae.pt"),
        (("import", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")), "none"),
    ]
    for args, needle in cases:
        code, out, err = cli(*args)
        assert code == 2 and needle in err, (args, err)
    assert not (tmp_path / "o").exists()

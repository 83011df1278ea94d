"""``settings.model_dtype``: the host model in bfloat16 (CUDA's default) against float32 on the real model, and a
tiny upgrade with a bfloat16 host model on CPU end to end (extraction, the SAE splice for delta CE, the report).

Tolerance (docs/method.md#host-model-dtype): bfloat16 keeps 8 significant bits (relative rounding 2^-9 per
operation), so the truncated forward's activations differ from float32's by about 1% of their norm after a few
blocks (measured at blocks.3.hook_resid_post on 8 BBC News sequences of 64 tokens: 0.8% overall, 0.7% median per
token). The test allows 3% overall and a cosine of at least 0.99 for every token.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from rsae.config import UpgradeConfig
from rsae.data import iter_sequences
from rsae.errors import ModelError
from rsae.hooks import HookCapture, site_for
from rsae.models import load_model, resolve_dtype
from rsae.pipeline import run_upgrade
from rsae.saes import ReLUSAE

BF16_REL_TOL = 0.03
BF16_MIN_COS = 0.99


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype(None, "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype("float32", "cuda") == "float32"
    with pytest.raises(ModelError) as e:
        resolve_dtype("int8", "cpu")
    assert e.value.field == "model_dtype"


@pytest.mark.slow
def test_bfloat16_truncated_forward_is_close_to_float32():
    m32, tok = load_model("smollm2-135m")
    m16, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16 and next(m32.parameters()).dtype == torch.float32
    it = iter_sequences(tok, "bbc-news", "eval", ctx_len=64, eval_fraction=0.2, seed=0)
    ids = torch.tensor([s for s, _ in itertools.islice(it, 8)])
    out = []
    for m in (m32, m16):
        with HookCapture(m, site_for(m, 3)) as cap:
            out.append(cap.run(m, ids)[:, 1:])  # position 0 (the attention sink) is dropped by default
    a, b = out
    assert b.dtype == torch.float32  # handed to the SAE in float32
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < BF16_REL_TOL, rel  # not float32 in disguise, and close
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > BF16_MIN_COS


@pytest.mark.slow
def test_a_tiny_upgrade_with_a_bfloat16_host_model(tmp_path: Path):
    teacher = ReLUSAE(576, 128)
    teacher.init_weights(torch.Generator().manual_seed(0))
    cfg = UpgradeConfig(
        layer=1,
        teacher=str(teacher.save(tmp_path / "t")),
        model_dtype="bfloat16",
        data={"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 32},
        calibrate={"steps": 10, "tokens": 512},
        finetune={"steps": 10, "batch_size": 256, "eval_every": 10, "control": False},
        eval={"ce_sequences": 2, "probe_ks": []},
    )
    report = run_upgrade(cfg, tmp_path / "out", work_dir=tmp_path / "work")
    assert report["host_model"]["dtype"] == "bfloat16"
    assert report["data"]["storage"]["mode"] == "disk"
    for name in ("teacher", "rsae"):
        m = report["metrics"][name]
        assert all(math.isfinite(m[k]) for k in ("mse", "fvu", "l0", "delta_ce", "kl")), (name, m)
    core = json.loads((tmp_path / "out" / "core_eval_results.json").read_text())
    assert core["eval_config"]["llm_dtype"] == "bfloat16"
    manifest = json.loads((tmp_path / "work" / "acts-train" / "manifest.json").read_text())
    assert manifest["model_dtype"] == "bfloat16"

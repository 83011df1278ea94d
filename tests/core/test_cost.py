"""``rsae.cost``: the work and memory model behind ``POST /v1/jobs/estimate``, on the real bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from rsae.config import UpgradeConfig
from rsae.cost import (
    DEFAULT_RATES,
    ESTIMATED_STAGES,
    WORK_UNITS,
    JobSizes,
    memory_estimate,
    model_param_count,
    stage_work,
)
from rsae.models import BUNDLED_CONFIGS, _bundled_folder


def test_bundled_config_and_parameter_count_match_the_converted_model() -> None:
    """The keys the API knows without loading SmolLM2-135M are those of its converted config.json, and the
    parameter count from them is the number of values in its weights file."""
    folder = _bundled_folder("smollm2-135m")
    real = json.loads((folder / "config.json").read_text())
    assert {k: real[k] for k in BUNDLED_CONFIGS["smollm2-135m"]} == BUNDLED_CONFIGS["smollm2-135m"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        n = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert model_param_count(real) == n == model_param_count(BUNDLED_CONFIGS["smollm2-135m"])


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _sizes(**settings: object) -> JobSizes:
    cfg = UpgradeConfig.model_validate({"teacher": "t", **settings})
    return JobSizes.from_config(cfg, d_model=576, n_layers=30, layer=3, d_in=576, d_sae=2304, ctx_len=128)


def test_work_scales_with_the_sizes_it_names() -> None:
    base = stage_work(_sizes())
    assert set(base) == set(ESTIMATED_STAGES) == set(WORK_UNITS) == set(DEFAULT_RATES)
    double = stage_work(_sizes(data={"train_tokens": 2 * 131072, "eval_tokens": 2 * 8192}, finetune={"steps": 1200}))
    assert double["extract"] == 2 * base["extract"] and double["finetune"] == 2 * base["finetune"]
    assert double["calibrate"] == base["calibrate"] and double["init"] == base["init"]
    no_control = stage_work(_sizes(finetune={"control": False}))
    assert no_control["finetune"] == base["finetune"] / 2 and no_control["evaluate"] < base["evaluate"]
    unknown = stage_work(JobSizes.from_config(UpgradeConfig(teacher="t"), d_model=576, n_layers=30, layer=3))
    assert unknown["extract"] == base["extract"] and unknown["finetune"] is None and unknown["calibrate"] > 0


def test_memory_on_cpu_and_cuda() -> None:
    s = _sizes()
    params = model_param_count(BUNDLED_CONFIGS["smollm2-135m"])
    cpu = memory_estimate(s, params, 49152, "cpu")
    cuda = memory_estimate(s, params, 49152, "cuda:NVIDIA H100")
    assert cpu.accelerator is None and cpu.host > params * 4
    assert cuda.accelerator > params * 4 and cuda.host < cpu.host
    bigger = memory_estimate(_sizes(finetune={"batch_size": 8192}), params, 49152, "cpu")
    assert bigger.by_stage["finetune"] > cpu.by_stage["finetune"]
    assert memory_estimate(s, None, None, "cpu").host is None


def test_sizes_round_trip_and_from_a_report() -> None:
    s = _sizes()
    assert JobSizes.from_dict({**s.to_dict(), "from_a_newer_worker": 1}) == s
    report = json.loads((Path(__file__).parents[1] / "data" / "report_example.json").read_text())
    got = JobSizes.from_report(report)
    assert (got.train_tokens, got.eval_tokens, got.d_sae, got.layer) == (32766, 8128, 2304, 12)
    with pytest.raises(KeyError):
        JobSizes.from_report({"config": report["config"]})

"""The pipeline package: each stage called alone on a small state, resume at the last finished stage, and a
family defined entirely in this file, registered, and upgraded through the real pipeline.

Real model (SmolLM2-135M, layer 1) on real text (BBC News), small sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rsae.config import STAGES, UpgradeConfig
from rsae.errors import Cancelled
from rsae.identity import IDENTITY_FILE, load_identity
from rsae.pipeline import PIPELINE, RunContext, new_state, run_upgrade
from rsae.pipeline.calibrate import calibrate
from rsae.pipeline.evaluate import evaluate
from rsae.pipeline.extract import extract
from rsae.pipeline.finetune import finetune
from rsae.pipeline.initialize import initialize
from rsae.pipeline.package import package
from rsae.saes import SAE, Family, JumpRule, ReLUSAE, load_sae, register_family
from support.browser import run_chromium

pytestmark = pytest.mark.slow

LAYER = 1
SMALL = {
    "data": {"train_tokens": 4096, "eval_tokens": 1024, "ctx_len": 64},
    "calibrate": {"steps": 20, "tokens": 1024},
    "finetune": {"steps": 20, "batch_size": 256, "eval_every": 10},
    "eval": {"ce_sequences": 2, "probe_ks": []},
}


# -- a toy family, defined only here -----------------------------------------------------------------------
class SharedJumpSAE(SAE):
    """Toy gate: one threshold shared by all latents, z = h * H(h - theta), theta from ``cfg.json``."""

    architecture = "toy_shared_jump"
    family = "toy_shared_jump"

    def __init__(self, d_in: int, d_sae: int, *, theta: float = 0.5, **kw: Any) -> None:
        super().__init__(d_in, d_sae, **kw)
        self.theta = float(theta)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``h * (h > theta)``."""
        return h * (h > self.theta)

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus ``toy_theta``."""
        return {**super().cfg_dict(), "toy_theta": self.theta}

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], **kw: Any) -> "SharedJumpSAE":
        """Build from cfg + tensors."""
        return super().from_parts(cfg, tensors, theta=cfg["toy_theta"], **kw)


class SharedJumpFamily(Family):
    """Its family: a per-latent jump rule with the same theta for every latent; defaults otherwise."""

    name = "toy_shared_jump"
    sae_class = SharedJumpSAE
    degrees = (7, 6)

    def jump_rule(self, teacher: SAE, h: torch.Tensor, remez: Any) -> JumpRule:
        """theta [d_sae] = the shared threshold."""
        return JumpRule(torch.full((teacher.d_sae,), teacher.theta, device=h.device), {"rule": "shared theta"})


register_family(SharedJumpFamily())


# -- fixtures ----------------------------------------------------------------------------------------------
def _teacher(folder: Path, cls: type[SAE] = ReLUSAE, d_sae: int = 128, **kw: Any) -> Path:
    """A small untrained teacher (tied random init, seeded), saved in the SAELens layout."""
    sae = cls(576, d_sae, **kw)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae.save(folder)


def _cfg(teacher: Path, **over: Any) -> UpgradeConfig:
    settings = json.loads(json.dumps(SMALL))
    for k, v in over.items():
        settings.setdefault(k, {}).update(v)
    return UpgradeConfig(layer=LAYER, teacher=str(teacher), **settings)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir shared by the module: activations are extracted once and reused by later states."""
    return tmp_path_factory.mktemp("pipeline-work")


# -- tests -------------------------------------------------------------------------------------------------
def test_stage_order_matches_config():
    assert tuple(PIPELINE) == STAGES


def test_each_stage_runs_alone_on_a_small_state(tmp_path: Path, work: Path):
    """The six stages called one by one on a small state: each fills its own fields."""
    cfg = _cfg(_teacher(tmp_path / "t"))
    state = new_state(cfg, tmp_path / "out", work, "cpu")
    ctx = RunContext()
    extract(state, ctx)
    assert state.train.rows == 4096 and state.evals.rows == 1024 and state.host.d_model == 576
    assert state.rsae is None
    initialize(state, ctx)
    assert state.init.params.p == 5 and state.rsae is not None and state.calibration is None
    torch.testing.assert_close(state.rsae.W_enc, state.teacher.W_enc)
    calibrate(state, ctx)
    assert state.calibration.steps == 20 and state.rsae_init is not None
    # the calibrated RSAE reproduces the teacher's L0 on the calibration tokens (the floor's rule)
    assert state.init_metrics.l0 == pytest.approx(state.teacher_metrics.l0, rel=0.1)
    before = state.rsae.W_dec.detach().clone()
    finetune(state, ctx)
    assert not torch.equal(before, state.rsae.W_dec) and len(state.finetune.curve) == 2
    assert state.control is not None and state.control_section.curve[-1].step == 20
    evaluate(state, ctx)
    assert set(state.metrics) == {"teacher", "rsae_init", "rsae", "control"} and state.report is None
    assert state.metrics["rsae"].delta_ce is not None and state.plots.gate.latent is None  # ReLU: shared gate
    _check_identity(state.identity.model_dump(mode="json"), state.metrics, work / IDENTITY_FILE)
    package(state, ctx)
    assert state.report["metrics"]["rsae"]["mse"] == state.metrics["rsae"].mse
    assert state.report["latent_identity"] == state.identity.model_dump(mode="json")
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "report.html").is_file()
    assert load_sae(tmp_path / "out").d_sae == 128
    assert (tmp_path / "out" / IDENTITY_FILE).read_bytes() == (work / IDENTITY_FILE).read_bytes()
    # the real report in headless Chromium: the identity plots are there and decode
    dom = run_chromium(["--dump-dom", (tmp_path / "out" / "report.html").resolve().as_uri()], tmp_path).stdout
    assert 'data-plots-ok="true"' in dom and '<table id="identity"' in dom
    for plot in ("identity-scatter", "identity-cosine", "identity-density"):
        assert f'data-plot="{plot}"' in dom, plot


def _check_identity(section: dict[str, Any], metrics: dict[str, Any], artifact: Path) -> None:
    """The latent identity of a real small upgrade agrees with the held-out metrics and with its artifact."""
    d_sae = 128
    assert section["n_tokens"] == metrics["rsae"].n_tokens == 1024 and section["d_sae"] == d_sae
    assert set(section["vs_teacher"]) == {"rsae", "control"}
    for k in ("teacher", "rsae", "control"):
        # mean firing rate over latents x d_sae = mean active latents per token = L0; dead latents = not alive
        assert section["firing_rate"][k]["mean"] * d_sae == pytest.approx(metrics[k].l0, rel=1e-9), k
        assert 1 - section["dead"][k] / d_sae == pytest.approx(metrics[k].alive_fraction), k
    ident = load_identity(artifact)
    for k, change in section["vs_teacher"].items():
        # 20 fine-tuning steps from the (untrained) teacher: latents keep their direction and stay clearly
        # correlated with the teacher's (the RSAE fires less: its floor is set on the calibration tokens)
        assert 0.9 < change["decoder_cos"]["median"] <= 1.0 and 0.3 < change["activation_corr"]["median"] <= 1.0
        assert change["died"] == int(ident.died(k).sum()) and change["born"] == int(ident.born(k).sum())
        assert change["decoder_cos"]["n"] == d_sae
        fired = int((ident.counts["teacher"] > 0).sum())
        assert change["firing_rate_ratio"]["n"] == fired and change["corr_undefined"] >= d_sae - fired
    assert sum(section["decoder_cos_hist"]["rsae"]["counts"]) == d_sae
    assert len(section["scatter"]["latents"]) == d_sae and not section["scatter"]["sampled"]


def test_resume_restarts_at_the_last_finished_stage(tmp_path: Path, work: Path):
    """Cancelled during finetune, rerun: extract, init and calibrate come from the saved state, and the
    result equals an uninterrupted run's exactly."""
    teacher = _teacher(tmp_path / "t")
    cfg = _cfg(teacher, eval={"ce_sequences": 0})
    full = run_upgrade(cfg, tmp_path / "full", work_dir=work)
    events: list[tuple[str, dict]] = []
    wd = tmp_path / "resumable"
    with pytest.raises(Cancelled):
        run_upgrade(
            cfg,
            tmp_path / "a",
            work_dir=wd,
            checkpoint_every=5,
            should_cancel=lambda: (
                (wd / "checkpoints" / "state.pt").is_file() and json.dumps(events).count('"calibrate"') > 0
            ),
            on_checkpoint=lambda kind, info: events.append((kind, info)),
        )
    assert [i["stage"] for k, i in events if k == "saved" and i["name"] == "state"] == ["extract", "init", "calibrate"]
    events.clear()
    again = run_upgrade(
        cfg,
        tmp_path / "b",
        work_dir=wd,
        checkpoint_every=5,
        on_checkpoint=lambda kind, info: events.append((kind, info)),
    )
    resumed = [i for k, i in events if k == "resumed"]
    assert resumed[0] == {
        "name": "state",
        "stage": "finetune",
        "step": None,
        "reused": ["extract", "init", "calibrate"],
    }
    assert again["metrics"] == full["metrics"]
    assert again["timings_s"].keys() == full["timings_s"].keys()


def test_a_family_defined_in_a_test_is_upgraded_through_the_pipeline(tmp_path: Path, work: Path):
    """The toy family above, registered at import: its teacher loads from cfg.json, the pipeline asks the
    family for its jump rule and Remez degrees, and the RSAE at init reproduces the teacher."""
    teacher = _teacher(tmp_path / "toy", SharedJumpSAE, theta=0.2)
    assert isinstance(load_sae(teacher), SharedJumpSAE)
    report = run_upgrade(_cfg(teacher), tmp_path / "out", work_dir=work)
    assert report["teacher"]["family"] == "toy_shared_jump" and report["teacher"]["architecture"] == "toy_shared_jump"
    assert (report["remez"]["p"], report["remez"]["q"]) == (7, 6) and report["remez"]["family"] == "toy_shared_jump"
    assert report["calibration"]["thresholds"]["rule"] == "shared theta"
    m = report["metrics"]
    assert m["teacher"]["l0"] > 0
    assert abs(m["rsae_init"]["mse"] / m["teacher"]["mse"] - 1) < 0.05, m
    assert abs(m["rsae_init"]["l0"] / m["teacher"]["l0"] - 1) < 0.05, m
    rsae = load_sae(tmp_path / "out")
    assert rsae.rational_cfg["teacher_family"] == "toy_shared_jump"
    x = torch.randn(4, 576) * 10
    assert torch.isfinite(rsae(x)).all()


def test_kl_objective_and_l0_penalty_give_the_control_the_same_budget(tmp_path: Path, work: Path):
    """finetune.objective 'mse+kl' on a JumpReLU upgrade with the RSAE's L0 penalty: the RSAE and the control
    both train with the KL term (same beta, same sequences, steps and batch size, asserted from the report),
    and the RSAE's penalty is the control's L0 one."""
    from rsae.saes import JumpReLUSAE

    teacher = _teacher(tmp_path / "t", cls=JumpReLUSAE)
    cfg = _cfg(
        teacher,
        finetune={"steps": 4, "eval_every": 2, "objective": "mse+kl", "kl_sequences": 1, "rsae_penalty": "l0"},
    )
    run_upgrade(cfg, tmp_path / "out", work_dir=work)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ft, control = report["finetune"], report["control"]
    assert ft["objective"] == "mse+kl" and ft["kl_coefficient"] > 0 and ft["kl_sequences"] == 1
    assert ft["final_train"]["kl"] >= 0 and control["final_train"]["kl"] >= 0
    assert (control["steps"], control["batch_size"]) == (ft["steps"], ft["batch_size"]) == (4, 256)
    assert "KL" in control["objective"] and "L0" in control["objective"]
    assert "L0" in ft["l1_source"]  # the RSAE's penalty is the control's own
    assert ft["l0_target"] is not None and control["curve"][-1]["step"] == ft["curve"][-1]["step"] == 4

"""Teacher checks shared by the API and the pipeline (:mod:`rsae.checks`), and declared sizes of teacher files
(:mod:`rsae.declared`): degenerate teachers are refused with a typed error naming the cause, where the weights
tell at once, and where only the data tells in the first stage that sees activations, never at packaging."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rsae.checks import MIN_THRESHOLD, check_teacher, teacher_problems
from rsae.config import UpgradeConfig
from rsae.declared import check_declared_size, declared_bytes
from rsae.errors import (
    DeadTeacherError,
    InvalidThresholdsError,
    NonFiniteTeacherError,
    RSAEError,
    TeacherError,
    TeacherTooLargeError,
)
from rsae.formats import load_teacher
from rsae.pipeline.initialize import initialize
from rsae.pipeline.progress import Progress, RunContext
from rsae.pipeline.state import UpgradeState, new_state
from rsae.saes import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, get_family

D_IN, D_SAE = 64, 256


def _sae(cls: type[SAE] = ReLUSAE, **kw) -> SAE:
    sae = cls(D_IN, D_SAE, **kw)
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae


def _edit(sae: SAE, fn) -> SAE:
    with torch.no_grad():
        fn(sae)
    return sae


def test_healthy_teachers_of_every_family_pass() -> None:
    for sae in (_sae(), _sae(JumpReLUSAE), _sae(TopKSAE, k=8)):
        assert teacher_problems(sae) == []


DEGENERATE = {
    "all-zero weights": (lambda s: (s.W_enc.zero_(), s.W_dec.zero_()), DeadTeacherError, "teacher"),
    "zero decoder": (lambda s: s.W_dec.zero_(), DeadTeacherError, "teacher"),
    "b_enc far below any input": (lambda s: s.b_enc.fill_(-1e7), DeadTeacherError, "teacher"),
    "decoder overflows float32": (lambda s: s.W_dec.fill_(1e38), NonFiniteTeacherError, "teacher"),
    "encoder overflows float32": (lambda s: s.W_enc.mul_(1e38), NonFiniteTeacherError, "teacher"),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_teacher_is_refused_with_its_cause(case: str) -> None:
    edit, error, field = DEGENERATE[case]
    with pytest.raises(error) as e:
        check_teacher(_edit(_sae(), edit))
    assert e.value.field == field and "Hint" in e.value.message


def test_thresholds_at_or_below_zero_in_the_file_are_invalid(tmp_path: Path) -> None:
    """Gemma Scope params.npz with two negative thresholds: read (raised to 1.2e-38, the reader's convention),
    refused for an upgrade with the count and the cause."""
    sae = _sae(JumpReLUSAE)
    arrays = {k: v.detach().numpy() for k, v in sae.file_tensors().items()}
    arrays["threshold"][:2] = -0.5
    np.savez(tmp_path / "params.npz", **arrays)
    teacher = load_teacher(tmp_path).sae
    with pytest.raises(InvalidThresholdsError) as e:
        check_teacher(teacher, field="params.npz")
    assert e.value.field == "params.npz.threshold" and e.value.code == "invalid_thresholds"
    assert "2 of 256" in e.value.message
    tiny = _edit(_sae(JumpReLUSAE), lambda s: s.log_threshold[:3].fill_(float(np.log(MIN_THRESHOLD / 10))))
    assert [type(p) for p in teacher_problems(tiny)] == [InvalidThresholdsError]


class _Acts:
    """Stands in for an :class:`rsae.activations.ActivationStore`: ``load(n)`` gives the first n rows."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def load(self, n: int) -> torch.Tensor:
        return self.x[:n]


def _state(teacher: SAE, x: torch.Tensor, tmp_path: Path, tail: str = "linear") -> UpgradeState:
    cfg = UpgradeConfig(
        model="smollm2-135m",
        layer=1,
        teacher=str(teacher.save(tmp_path / "t")),
        calibrate={"tokens": 512},
        remez={"tail": tail},
    )
    state = UpgradeState(cfg, tmp_path / "out", tmp_path / "work", "cpu", get_family(teacher.family), teacher)
    state.train = _Acts(x)  # type: ignore[assignment]
    return state


def test_pipeline_refuses_a_degenerate_teacher_when_it_loads_it(tmp_path: Path) -> None:
    """The worker's first step (new_state, before extraction) runs the same checks: hub and local teachers too."""
    dead = _edit(_sae(), lambda s: s.b_enc.fill_(-1e7)).save(tmp_path / "dead")
    cfg = UpgradeConfig(model="smollm2-135m", layer=1, teacher=str(dead))
    with pytest.raises(DeadTeacherError):
        new_state(cfg, tmp_path / "out", tmp_path / "work", "cpu")


def test_teacher_dead_on_the_real_activations_fails_where_they_are_first_seen(tmp_path: Path) -> None:
    # Fires for large inputs (so the weights alone pass), never on activations of RMS 1.
    teacher = _edit(_sae(), lambda s: s.b_enc.fill_(-50.0))
    assert teacher_problems(teacher) == []
    state = _state(teacher, torch.randn(1024, D_IN, generator=torch.Generator().manual_seed(1)), tmp_path)
    with pytest.raises(DeadTeacherError) as e:
        state.calibration_data()  # what extract calls at its end
    where = "the calibration tokens of smollm2-135m at blocks.1.hook_resid_post"
    assert f"no latent of the teacher fires on 512 of {where}" in e.value.message
    # Finite on probe activations of RMS <= 10, overflows float32 on activations of RMS 1e9.
    big = _edit(_sae(), lambda s: s.W_enc.mul_(1e30))
    assert teacher_problems(big) == []
    huge = _state(big, 1e9 * torch.randn(1024, D_IN, generator=torch.Generator().manual_seed(1)), tmp_path / "huge")
    with pytest.raises(NonFiniteTeacherError):
        huge.calibration_data()


def test_thresholds_too_small_for_the_data_fail_at_init_not_at_packaging(tmp_path: Path) -> None:
    """Without the linear tail (``remez.tail = "none"``, the gate of older upgrades) thresholds of 1e-7 put
    h / theta beyond float32 in the extrapolated rational: the job fails at init with the cause. With the tail
    (the default) the same teacher initialises, finite: those latents pass h above their threshold."""
    teacher = _edit(_sae(JumpReLUSAE), lambda s: s.log_threshold[:5].fill_(float(np.log(1e-7))))
    assert teacher_problems(teacher) == []  # above MIN_THRESHOLD: only the data can tell
    x = 3 * torch.randn(1024, D_IN, generator=torch.Generator().manual_seed(2))
    state = _state(teacher, x, tmp_path, tail="none")
    with pytest.raises(InvalidThresholdsError) as e:
        initialize(state, RunContext(Progress(None, None), None))
    assert "5 latents" in e.value.message and "learning rates does not help" in e.value.message
    state = _state(teacher, x, tmp_path / "tail")
    initialize(state, RunContext(Progress(None, None), None))
    h = teacher.pre_acts(x[:256])
    z = state.rsae.gate(h).detach()
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[:, :5], teacher.gate(h)[:, :5].detach(), rtol=0.02, atol=0.02)


def _npz_bomb(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("W_enc.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": shape})
        f.write(bytes(1 << 16))  # far less data than the header declares
    return buf.getvalue()


def test_declared_sizes_come_from_headers_only(tmp_path: Path) -> None:
    (tmp_path / "npz").mkdir()
    (tmp_path / "npz" / "params.npz").write_bytes(_npz_bomb((1 << 20, 1 << 10)))
    # float16 counts as float32: 2^30 elements x 4 bytes
    assert declared_bytes(tmp_path / "npz") == {"params.npz": 4 << 30}
    with pytest.raises(TeacherTooLargeError) as e:
        check_declared_size(tmp_path / "npz", 1 << 30)
    assert e.value.field == "params.npz" and e.value.code == "teacher_too_large"

    (tmp_path / "st").mkdir()
    header = json.dumps({"W_enc": {"dtype": "BF16", "shape": [D_IN, 1 << 20], "data_offsets": [0, D_IN << 21]}})
    (tmp_path / "st" / "sae_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    (tmp_path / "st" / "cfg.json").write_text("{}")
    assert declared_bytes(tmp_path / "st") == {"sae_weights.safetensors": D_IN << 22}

    (tmp_path / "pt").mkdir()
    buf = io.BytesIO()
    torch.save({"encoder.weight": torch.zeros(D_SAE, D_IN)}, buf)
    (tmp_path / "pt" / "ae.pt").write_bytes(buf.getvalue())
    assert declared_bytes(tmp_path / "pt")["ae.pt"] >= D_SAE * D_IN * 4
    assert check_declared_size(tmp_path / "pt", 1 << 20) >= D_SAE * D_IN * 4


def test_deep_json_is_a_teacher_error_not_a_crash(tmp_path: Path) -> None:
    _sae().save(tmp_path)
    (tmp_path / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TeacherError) as e:
        load_teacher(tmp_path)
    assert e.value.field == "cfg.json" and "nested too deeply" in e.value.message


def test_errors_cross_process_boundaries_with_their_field() -> None:
    for err in (DeadTeacherError("dead", field="params"), RSAEError("x"), TeacherTooLargeError("big", field="ae")):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.message, back.field, back.code) == (type(err), err.message, err.field, err.code)

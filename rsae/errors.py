"""Exceptions raised by :mod:`rsae`. The service maps them to HTTP 4xx problem+json bodies."""

from __future__ import annotations


class RSAEError(Exception):
    """Base class. ``field`` names the offending input (dotted path) when there is one."""

    code = "rsae_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple:
        """Pickle with ``field`` (the default keeps only ``args``), so errors cross process boundaries intact."""
        return _rebuild, (type(self), self.message, self.field)


def _rebuild(cls: type[RSAEError], message: str, field: str | None) -> RSAEError:
    return cls(message, field=field)


class TeacherError(RSAEError):
    """The teacher SAE folder is unreadable or inconsistent (missing file, bad shape, NaN, bad cfg)."""

    code = "invalid_teacher"


class ModelError(RSAEError):
    """The host model cannot be resolved or loaded, or the layer is out of range."""

    code = "invalid_model"


class HookError(ModelError):
    """The hook site is unreadable, not in the host model, or contradicts the teacher's cfg (field ``hook`` or
    ``layer``; :func:`rsae.hooknames.choose_site`)."""

    code = "invalid_hook"


class DataError(RSAEError):
    """The text data set cannot be read or yields too few tokens."""

    code = "invalid_dataset"


class Cancelled(RSAEError):
    """Raised inside the pipeline when the caller's ``should_cancel`` returns True."""

    code = "cancelled"


class NumericalError(RSAEError):
    """The upgrade produced non-finite weights (NaN/Inf); nothing is written. Deterministic for the same
    inputs and settings: retrying does not help, other settings (e.g. a lower learning rate) may."""

    code = "non_finite_weights"


class TeacherTooLargeError(TeacherError):
    """The teacher's files declare more data than the configured limit (a compressed ``.npz`` or ``ae.pt``
    that would expand past it, or a safetensors header declaring huge tensors); nothing was read beyond
    the headers. The service answers 413."""

    code = "teacher_too_large"


class DeadTeacherError(TeacherError):
    """The teacher has no live latent: none can fire (zero encoder columns below the gate, zero decoder
    rows), none fires on any probe input, or none fires on the real activations. An upgrade of it would end
    with L0 0, so it is refused."""

    code = "dead_teacher"


class NonFiniteTeacherError(TeacherError):
    """The teacher's forward pass gives NaN or Inf (e.g. finite float32 weights whose products overflow)."""

    code = "non_finite_teacher"


class InvalidThresholdsError(TeacherError):
    """The teacher's per-latent thresholds cannot be upgraded: non-positive in the source (read as the
    smallest float32), below :data:`rsae.checks.MIN_THRESHOLD`, or so small compared with the real
    pre-activations that the rational gate's input overflows float32."""

    code = "invalid_thresholds"

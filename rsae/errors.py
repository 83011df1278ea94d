"""Exceptions raised by :mod:`rsae`. The service maps them to HTTP 4xx problem+json bodies."""

from __future__ import annotations


class RSAEError(Exception):
    """Base class. ``field`` names the offending input (dotted path) when there is one."""

    code = "rsae_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class TeacherError(RSAEError):
    """The teacher SAE folder is unreadable or inconsistent (missing file, bad shape, NaN, bad cfg)."""

    code = "invalid_teacher"


class ModelError(RSAEError):
    """The host model cannot be resolved or loaded, or the layer is out of range."""

    code = "invalid_model"


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

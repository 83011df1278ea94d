"""SAE families, one module each, behind one registry.

- :mod:`~rsae.saes.base`: the :class:`SAE` base class (SAELens layout), load/save, the ``cfg.json``
  architecture registry.
- :mod:`~rsae.saes.family`: :class:`Family`, what the upgrade asks of a teacher family, and the family
  registry (:func:`register_family`, :func:`get_family`).
- :mod:`~rsae.saes.relu`, :mod:`~rsae.saes.jumprelu`, :mod:`~rsae.saes.topk`: the teacher families.
- :mod:`~rsae.saes.rational`: the RSAE, the upgrade's output (architecture ``"rational"``).

Importing this package registers all of them.
"""

from .base import (
    CFG_NAME,
    CORE_TENSORS,
    MAX_DIM,
    SAE,
    SAE_REGISTRY,
    WEIGHTS_NAME,
    decoder_norm_l1,
    expected_shapes,
    is_finite_number,
    load_sae,
    register_architecture,
    sha256_file,
    validate_tensors,
)
from .family import Family, JumpRule, LossFn, Objective, family_names, get_family, register_family, sae_loss
from .jumprelu import JumpReLUSAE, jumprelu_l0_loss
from .rational import RationalGate, RationalSAE
from .relu import ReLUSAE
from .topk import TopKLoss, TopKSAE, topk_separating_threshold

__all__ = [
    "CFG_NAME",
    "CORE_TENSORS",
    "MAX_DIM",
    "SAE",
    "SAE_REGISTRY",
    "WEIGHTS_NAME",
    "Family",
    "JumpReLUSAE",
    "JumpRule",
    "LossFn",
    "Objective",
    "RationalGate",
    "RationalSAE",
    "ReLUSAE",
    "TopKLoss",
    "TopKSAE",
    "decoder_norm_l1",
    "expected_shapes",
    "family_names",
    "get_family",
    "is_finite_number",
    "jumprelu_l0_loss",
    "load_sae",
    "register_architecture",
    "register_family",
    "sae_loss",
    "sha256_file",
    "topk_separating_threshold",
    "validate_tensors",
]

"""Teacher SAEs written in the foreign formats the service reads (Gemma Scope, sparsify, dictionary_learning),
shared by the upload tests and the client tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

D_IN, D_SAE, K = 576, 96, 8


def weights(seed: int) -> dict[str, torch.Tensor]:
    """Random SAELens-orientation tensors (W_enc [D_IN, D_SAE], b_enc, W_dec [D_SAE, D_IN], b_dec) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / 24,
        "b_enc": torch.randn(D_SAE, generator=g) / 10,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 10,
        "b_dec": torch.randn(D_IN, generator=g) / 10,
    }


def write_gemma_scope(folder: Path) -> None:
    """A Gemma Scope ``params.npz`` (JumpReLU, thresholds 0.05) of :func:`weights` seed 1 in ``folder``."""
    d = {k: v.numpy() for k, v in weights(1).items()}
    d["threshold"] = np.full(D_SAE, 0.05, dtype=np.float32)
    np.savez(folder / "params.npz", **d)


def write_sparsify(folder: Path) -> None:
    """An EleutherAI sparsify TopK coder (k=K; ``cfg.json`` + ``sae.safetensors``), written by sparsify itself."""
    from sparsify import SparseCoder, SparseCoderConfig

    w = weights(2)
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():
        coder.encoder.weight.copy_(w["W_enc"].T)
        coder.encoder.bias.copy_(w["b_enc"])
        coder.W_dec.copy_(w["W_dec"])
        coder.b_dec.copy_(w["b_dec"])
    coder.save_to_disk(folder)


def write_dictionary_learning(folder: Path) -> None:
    """A dictionary_learning ``AutoEncoder`` (``ae.pt`` + ``config.json``) of :func:`weights` seed 3."""
    w = weights(3)
    state = {
        "encoder.weight": w["W_enc"].T.contiguous(),
        "encoder.bias": w["b_enc"],
        "decoder.weight": w["W_dec"].T.contiguous(),
        "bias": w["b_dec"],
    }
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "trainer": {
                    "dict_class": "AutoEncoder",
                    "activation_dim": D_IN,
                    "dict_size": D_SAE,
                    "layer": 3,
                    "lm_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                }
            }
        )
    )

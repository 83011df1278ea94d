"""Metric functions on hand-computable cases."""

import pytest
import torch

from rsae.evaluate import reconstruction_metrics
from rsae.saes import SAE, decoder_norm_l1


class _Fixed(SAE):
    """Identity-sized SAE whose latents are given directly (gate = identity on h = x @ I)."""

    architecture = "test"

    def __init__(self, d):
        super().__init__(d, d, apply_b_dec_to_input=False)
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(d))
            self.W_dec.copy_(torch.eye(d))

    def gate(self, h):
        return torch.where(h.abs() > 1.5, h, torch.zeros_like(h))


def test_mse_fvu_l0_alive_by_hand():
    sae = _Fixed(2)
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [3.0, 1.0]])
    # z keeps |x| > 1.5: [[2,0],[0,3],[0,0],[3,0]] -> errors: [0,1],[0,0],[1,1],[0,1]
    m = reconstruction_metrics(sae, [x[:2], x[2:]])
    assert m["mse"] == pytest.approx((1 + 0 + 2 + 1) / 4)
    # per-dimension means (1.5, 1.5): SST = (0.25+2.25+0.25+2.25) + (0.25+2.25+0.25+0.25) = 8
    assert m["fvu"] == pytest.approx(4 / 8)
    assert m["fvu_about_zero"] == pytest.approx(4 / (4 + 1 + 0 + 9 + 1 + 1 + 9 + 1))
    assert m["l0"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert m["alive_fraction"] == pytest.approx(1.0)
    assert m["n_tokens"] == 4


def test_alive_fraction_counts_dead_latents():
    sae = _Fixed(3)
    x = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert reconstruction_metrics(sae, [x])["alive_fraction"] == pytest.approx(1 / 3)


def test_decoder_norm_l1():
    z = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    W_dec = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5, 2
    assert decoder_norm_l1(z, W_dec).item() == pytest.approx(((5 + 4) + 6) / 2)

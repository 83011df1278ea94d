"""The downstream-aware term of ``finetune.objective = "mse+kl"`` (rsae.kl): its gradient w.r.t. the SAE's
parameters against central finite differences on a tiny random GPT-2 in float64 (GPT-2 keeps float64 throughout;
Llama's RMSNorm and rotary tables compute in float32, which limits finite differences to ~1e-3); KL is 0 for a perfect
reconstruction and positive otherwise; the host model stays frozen; the same seed draws the same sequences."""

import pytest
import torch
import transformers as tf

from rsae.hooks import site_for
from rsae.kl import KLTerm, spliced_kl, with_kl
from rsae.saes import ReLUSAE


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=16, bos_token_id=0, eos_token_id=0)
    return tf.AutoModelForCausalLM.from_config(cfg).double().eval()


def _sae(seed=0):
    sae = ReLUSAE(16, 24)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae.double()


def test_kl_gradient_matches_finite_differences():
    model = _tiny_gpt2()
    site = site_for(model, 0)
    ids = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(1))
    sae = _sae()
    term = KLTerm(model, site, ids, sequences=3, seed=0)
    try:
        kl = spliced_kl(model, term.splice, sae, ids)
        assert kl.item() > 0
        params = {"b_dec": sae.b_dec, "W_dec": sae.W_dec, "b_enc": sae.b_enc}
        grads = dict(zip(params, torch.autograd.grad(kl, list(params.values()))))
        g = torch.Generator().manual_seed(2)
        for name, p in params.items():
            for _ in range(3):
                idx = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in p.shape)
                eps = 1e-6
                with torch.no_grad():
                    old = p[idx].item()
                    p[idx] = old + eps
                    up = spliced_kl(model, term.splice, sae, ids).item()
                    p[idx] = old - eps
                    down = spliced_kl(model, term.splice, sae, ids).item()
                    p[idx] = old
                fd = (up - down) / (2 * eps)
                assert grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, idx)
    finally:
        term.close()


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_kl_is_zero_for_a_perfect_reconstruction_and_the_model_stays_frozen():
    model = _tiny_gpt2()
    ids = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(3))
    term = KLTerm(model, site_for(model, 1), ids, sequences=2, seed=0)
    try:
        assert all(not p.requires_grad for p in model.parameters())
        assert spliced_kl(model, term.splice, _Identity(), ids).item() == pytest.approx(0.0, abs=1e-12)
        assert term.splice.fn is None  # the model runs clean again after the term
    finally:
        term.close()


def test_with_kl_adds_beta_times_the_term_and_same_seed_same_sequences():
    model = _tiny_gpt2()
    ids = torch.randint(0, 37, (10, 7), generator=torch.Generator().manual_seed(4))
    sae = _sae(1)
    x = torch.randn(32, 16, dtype=torch.float64)
    a = KLTerm(model, site_for(model, 0), ids, sequences=2, seed=5)
    b = KLTerm(model, site_for(model, 0), ids, sequences=2, seed=5)
    try:
        loss_fn = with_kl(None, a, beta=3.0)
        loss, parts = loss_fn(sae, x, 0.1)
        kl_b = b(sae).item()  # the same draw
        assert parts["kl"] == pytest.approx(kl_b, rel=1e-12)
        assert loss.item() == pytest.approx(parts["mse"] + 0.1 * parts["l1"] + 3.0 * kl_b, rel=1e-9)
    finally:
        a.close()
        b.close()

"""Fine-tuning on real SmolLM2-135M activations (layer 3, BBC News): the L0 controller of ``train_sae``."""

import copy
import math

import pytest
import torch

from rsae.activations import ActivationStore, extract_activations
from rsae.models import load_model
from rsae.saes import ReLUSAE
from rsae.teacher import train_teacher
from rsae.train import train_sae

CTX = 64


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    """8,064 real training-split activation rows (126 sequences of 64 tokens, position 0 dropped)."""
    model, tok = load_model("smollm2-135m")
    out = tmp_path_factory.mktemp("train_acts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_probing.py: faster on the shared 2-core machine
    try:
        extract_activations(
            model,
            tok,
            layer=3,
            dataset="bbc-news",
            split="train",
            n_tokens=126 * (CTX - 1),
            out_dir=out,
            ctx_len=CTX,
            batch_size=16,
        )
    finally:
        torch.set_num_threads(threads)
    return ActivationStore(out)


@pytest.fixture(scope="module")
def teacher(acts) -> ReLUSAE:
    return train_teacher(acts, family="relu", d_sae=512, steps=150, batch_size=512, seed=0)


def _final_l0(sae, store) -> float:
    x = store.load(4096)
    with torch.no_grad():
        return (sae.encode(x) != 0).sum(-1).float().mean().item()


def test_l0_controller_brings_l0_to_its_target_from_a_far_lambda(acts, teacher):
    """Starting from lambda = 1/50 of the teacher's, the uncontrolled fine-tune ends far above the
    teacher's L0; with ``l0_target`` = 0.9 x the teacher's L0 the controller raises lambda and ends within
    10% of the target."""
    lam0 = float(teacher.metadata["l1_coefficient"]) / 50
    target = 0.9 * _final_l0(teacher, acts)
    runs = {}
    for name, l0_target in (("free", None), ("held", target)):
        sae = copy.deepcopy(teacher)
        hist = train_sae(
            sae, acts, steps=300, batch_size=512, lr=1e-3, l1_coefficient=lam0, seed=1, l0_target=l0_target
        )
        runs[name] = (_final_l0(sae, acts), hist[-1]["lambda"])
    free_l0, free_lam = runs["free"]
    held_l0, held_lam = runs["held"]
    assert free_lam == pytest.approx(lam0) and free_l0 > 1.3 * target
    assert held_lam > 3 * lam0
    assert abs(held_l0 / target - 1) < 0.10, (held_l0, target, held_lam)


def test_l0_controller_steps_are_bounded_by_max_step():
    """:class:`rsae.train.L0Controller`: one update per ``every`` steps, by exp(gain * (mean L0 / target - 1))
    within [1 / max_step, max_step]; no target: lambda never moves."""
    from rsae.train import L0Controller

    c = L0Controller(1.0, target=40.0, every=2, gain=2.0, max_step=1.1)
    c.update(80.0)
    assert c.lam == 1.0  # window not full yet
    c.update(80.0)
    assert c.lam == pytest.approx(1.1)  # exp(2) clipped to the max step
    for _ in range(2):
        c.update(10.0)
    assert c.lam == pytest.approx(1.1 / 1.1)
    for _ in range(2):
        c.update(41.0)
    assert c.lam == pytest.approx(math.exp(2.0 * 0.025))  # inside the bounds: the controller's own factor
    fixed = L0Controller(1.0, target=None)
    for _ in range(20):
        fixed.update(500.0)
    assert fixed.lam == 1.0

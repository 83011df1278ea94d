"""rsae.encode: text through the real SmolLM2-135M to the hook, the conventions' contexts and kept positions, and the
top-k latents, checked against an independent full forward (``output_hidden_states``) and a plain topk."""

from __future__ import annotations

import json

import pytest
import torch

from rsae.data import legacy_conventions, resolve_conventions
from rsae.encode import (
    EncodeSite,
    encode_rows,
    encode_texts,
    site_of_artifacts,
    site_of_teacher,
    text_contexts,
    top_latents,
)
from rsae.errors import DataError, ModelError
from rsae.models import load_model
from rsae.saes import ReLUSAE

TEXT = "The central bank raised interest rates on Thursday, surprising markets and analysts alike."


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def sae() -> ReLUSAE:
    s = ReLUSAE(d_in=576, d_sae=256, metadata={"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    s.init_weights(torch.Generator().manual_seed(0))
    return s.eval()


def test_contexts_follow_the_conventions(lm) -> None:
    _, tok = lm
    ids = tok(TEXT, add_special_tokens=False).input_ids
    saelens = resolve_conventions({}, {"context_size": 8, "prepend_bos": True, "seqpos_slice": [None]})
    ctxs = text_contexts(tok, [TEXT, ""], saelens)
    assert [c.ids[0] for c in ctxs] == [tok.bos_token_id] * len(ctxs)
    assert [t for c in ctxs for t in c.ids[1:]] == ids and all(len(c.ids) == 8 for c in ctxs[:-1])
    assert [c.index for c in ctxs] == list(range(len(ctxs))) and {c.text for c in ctxs} == {0}
    assert all(all(c.kept) for c in ctxs)
    excl = resolve_conventions({}, {"context_size": 8, "prepend_bos": True, "exclude_special_tokens": True})
    assert all(c.kept == [False] + [True] * (len(c.ids) - 1) for c in text_contexts(tok, [TEXT], excl))
    legacy = text_contexts(tok, [TEXT], legacy_conventions(8))
    assert [t for c in legacy for t in c.ids] == ids  # no BOS; position 0 of each context dropped
    assert all(c.kept == [False] + [True] * (len(c.ids) - 1) for c in legacy)


def test_encode_texts_equals_a_full_forward_and_topk(lm, sae) -> None:
    model, tok = lm
    conv = resolve_conventions({}, {"context_size": 16, "prepend_bos": True, "seqpos_slice": [1, None]})
    site = EncodeSite("smollm2-135m", "blocks.3.hook_resid_post", 3, conv)
    out = encode_texts(model, tok, {"teacher": sae}, [TEXT, "Short one."], site, 5)
    ctxs = text_contexts(tok, [TEXT, "Short one."], conv)
    assert [len(t) for t in out] == [sum(len(c.ids) for c in ctxs if c.text == i) for i in (0, 1)]
    for ctx in ctxs:
        hidden = model(torch.tensor([ctx.ids]), output_hidden_states=True).hidden_states[4][0]
        want = sae.encode(hidden)
        got = [t for t in out[ctx.text] if t["context"] == ctx.index]
        assert [t["token_id"] for t in got] == ctx.ids and got[0]["latents"] is None and not got[0]["kept"]
        for p, token in enumerate(got[1:], start=1):
            v, i = want[p].topk(5)
            keep = v > 0
            assert token["latents"]["teacher"]["indices"] == i[keep].tolist()
            assert token["latents"]["teacher"]["values"] == pytest.approx(v[keep].tolist(), rel=1e-4, abs=1e-5)
    assert out[1][1]["token"] == tok.decode([out[1][1]["token_id"]])


def test_top_latents_leave_out_exact_zeros_and_rows_are_checked(sae) -> None:
    z = torch.tensor([[0.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_latents(z, 3) == [{"indices": [1, 3], "values": [3.0, 1.0]}, {"indices": [], "values": []}]
    x = torch.randn(3, 576)
    rows = encode_rows({"teacher": sae}, x, 4)["teacher"]
    assert rows == top_latents(sae.encode(x), 4)
    with pytest.raises(DataError) as e:
        encode_rows({"teacher": sae}, torch.randn(2, 10), 4)
    assert e.value.field == "activations"


def test_sites_come_from_the_report_or_the_cfg(tmp_path, sae) -> None:
    site = site_of_teacher(sae, hook="blocks.3.hook_resid_post")
    assert (site.model, site.hook, site.conventions) == (
        "smollm2-135m",
        "blocks.3.hook_resid_post",
        legacy_conventions(),
    )
    with pytest.raises(ModelError) as e:
        site_of_teacher(sae)
    assert e.value.field == "hook"
    conv = resolve_conventions({}, {"context_size": 64, "prepend_bos": True}).to_dict()
    report = {"host_model": {"name": "smollm2-135m", "hook": "blocks.3.hook_resid_post", "layer": 3}}
    (tmp_path / "report.json").write_text(json.dumps({**report, "data": {"conventions": conv}}))
    site = site_of_artifacts(tmp_path)
    assert (site.model, site.hook, site.layer) == ("smollm2-135m", "blocks.3.hook_resid_post", 3)
    assert site.conventions == resolve_conventions({}, {"context_size": 64, "prepend_bos": True})

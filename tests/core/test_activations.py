"""Activation extraction on the real host model (SmolLM2-135M) and real text (BBC News)."""

import json

import pytest
import torch

from rsae.activations import ActivationStore, ResidualCapture, extract_activations
from rsae.data import BBC_CATEGORIES, iter_documents, split_of
from rsae.errors import DataError, ModelError
from rsae.models import check_layer, load_model, model_shape, resolve_model


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


def test_bundled_model_resolves_to_cached_safetensors():
    r = resolve_model("smollm2-135m")
    assert r.path_or_id and (__import__("pathlib").Path(r.path_or_id) / "model.safetensors").is_file()


def test_model_spec_validation(tmp_path):
    with pytest.raises(ModelError):
        resolve_model("https://evil.example/model")
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError):
        resolve_model("not a hub id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path / "empty"))


def test_layer_out_of_range(lm):
    model, _ = lm
    with pytest.raises(ModelError) as e:
        check_layer(model, 30)
    assert e.value.field == "layer"


def test_model_shape_without_loading(lm, tmp_path):
    """The bundled shape constant matches the loaded model; folders answer from config.json; hub ids not in
    the local cache are unknown (None) and malformed specs raise."""
    model, _ = lm
    assert model_shape("smollm2-135m") == (model.config.num_hidden_layers, model.config.hidden_size)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"n_layer": 12, "n_embd": 768}))
    assert model_shape(str(tmp_path / "m")) == (12, 768)
    assert model_shape("some-org/not-cached-anywhere") is None
    with pytest.raises(ModelError):
        model_shape("https://evil.example/model")


@pytest.mark.parametrize("layer", [0, 3, 12])
def test_truncated_capture_equals_full_hidden_state(lm, layer):
    model, tok = lm
    ids = torch.tensor([tok("The central bank raised interest rates on Thursday, surprising markets.").input_ids])
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    with ResidualCapture(model, layer) as cap:
        got = cap.run(model, ids)
    assert torch.equal(got, full)  # bit for bit


def test_bbc_split_is_disjoint_by_document():
    docs = list(iter_documents("bbc-news"))
    assert len(docs) == 2225 and {d.label for d in docs} == set(BBC_CATEGORIES)
    ev = {d.doc_id for d in docs if split_of(d.doc_id, 0.2, 0) == "eval"}
    tr = {d.doc_id for d in docs if split_of(d.doc_id, 0.2, 0) == "train"}
    assert not ev & tr and len(ev) + len(tr) == 2225
    assert 0.15 < len(ev) / 2225 < 0.25


def test_local_text_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond document\n\n\n")
    assert [d.text for d in iter_documents(str(tmp_path / "a.txt"))] == ["first document", "second document"]
    with pytest.raises(DataError):
        list(iter_documents(str(tmp_path / "nope")))


def test_extraction_shards_manifest_and_rows(lm, tmp_path):
    model, tok = lm
    man = extract_activations(
        model,
        tok,
        layer=2,
        dataset="bbc-news",
        split="eval",
        n_tokens=1000,
        out_dir=tmp_path,
        ctx_len=32,
        shard_tokens=310,
        batch_size=4,
    )
    assert man["rows"] == 1000 and man["position_0_dropped"] and man["d_in"] == 576
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["rows"] == 1000
    # shards hold whole sequences, bounded by shard_tokens (memory does not grow with the token count)
    assert all(s["rows"] <= 310 for s in man["shards"]) and len(man["shards"]) == 4
    store = ActivationStore(tmp_path)
    acts = store.load()
    assert acts.shape == (1000, 576)
    # rows are positions 1..31 of the stored sequences, identical to a fresh full-model forward
    ids, labels = store.sequences(2)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[3]
    assert torch.equal(hs[:, 1:].reshape(-1, 576), acts[:62])
    assert labels.min() >= 0
    batches = list(__import__("itertools").islice(store.iter_batches(128, seed=1), 7))
    assert all(b.shape == (128, 576) for b in batches)


def test_too_few_tokens_is_a_data_error(lm, tmp_path):
    model, tok = lm
    (tmp_path / "tiny.txt").write_text("A short text with only a few tokens in it at all.")
    with pytest.raises(DataError):
        extract_activations(
            model,
            tok,
            layer=1,
            dataset=str(tmp_path / "tiny.txt"),
            split="train",
            n_tokens=500,
            out_dir=tmp_path / "acts",
            ctx_len=8,
            eval_fraction=0.01,
        )


def test_spec_kinds_never_resolve_a_hub_id_against_the_working_directory(tmp_path, monkeypatch):
    """A well-formed hub id is a hub id even when a folder of that relative name exists here; anything that is
    neither bundled nor a hub id is a path (relative ones included); URLs are refused."""
    from rsae.models import model_spec_kind

    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 8}))
    monkeypatch.chdir(tmp_path)
    assert model_spec_kind("smollm2-135m") == "bundled"
    assert model_spec_kind("org/name") == "hub"
    assert resolve_model("org/name").path_or_id == "org/name"  # not the folder ./org/name
    for spec in ("README.md", "rsae/../../../etc/passwd", "org/name/../../x", "/etc", "~/x", "./org/name", "gpt2"):
        assert model_spec_kind(spec) == "path", spec
    assert model_shape("./org/name") == (2, 8)  # the CLI may still name a relative folder explicitly
    with pytest.raises(ModelError):
        model_spec_kind("https://evil.example/org/name")


def test_folder_dataset_skips_symlinks_out_of_the_folder(tmp_path):
    (tmp_path / "data" / "news").mkdir(parents=True)
    (tmp_path / "data" / "news" / "a.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "data" / "news" / "b.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "data" / "link").symlink_to(tmp_path, target_is_directory=True)
    assert [d.text for d in iter_documents(str(tmp_path / "data"))] == ["inside"]


def test_extraction_checks_the_caller_between_batches(lm, tmp_path):
    """``on_progress`` runs after every batch, so a cancellation raised from it stops extraction at once
    (not at the next shard: here the one shard would hold all 1,000 rows)."""
    from rsae.errors import Cancelled

    model, tok = lm
    calls = []

    def progress(frac):
        calls.append(frac)
        if len(calls) == 3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        extract_activations(
            model,
            tok,
            layer=1,
            dataset="bbc-news",
            split="eval",
            n_tokens=1000,
            out_dir=tmp_path,
            ctx_len=32,
            shard_tokens=10_000,
            batch_size=4,
            on_progress=progress,
        )
    assert calls == pytest.approx([4 * 31 / 1000, 8 * 31 / 1000, 12 * 31 / 1000])
    assert not (tmp_path / "manifest.json").exists()

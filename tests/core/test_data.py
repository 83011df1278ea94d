"""Data sources and context conventions (:mod:`rsae.data`): SAELens's chunking reproduced token for token (its
own ``concat_and_batch_sequences``, loaded from the installed ``sae_lens`` in this process), the conventions taken
from the request, the teacher or the defaults, and every source read without network (a local ``.jsonl`` /
``.parquet`` / ``save_to_disk`` folder, a hub id from a prepared offline ``datasets`` cache, pre-tokenized rows).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rsae.activations import kept_rows
from rsae.data import (
    LEGACY_DEFAULTS,
    ContextConventions,
    SourceOptions,
    concat_and_chunk,
    dataset_spec_kind,
    iter_documents,
    iter_sequences,
    resolve_conventions,
    special_tokens,
    split_of,
)
from rsae.errors import DataError
from support.hfdata import hf_offline, prepare_hf_cache

WORDS = "the a news market team game vote chip film bank rose fell won lost new old big small".split()


def _saelens_chunker():
    """SAELens's ``concat_and_batch_sequences`` from its installed source file (importing the ``sae_lens``
    package itself takes ~12 s; this module imports only torch and transformers)."""
    spec = importlib.util.find_spec("sae_lens")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenization_and_batching.py"
    mod_spec = importlib.util.spec_from_file_location("_saelens_tokenization_and_batching", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.concat_and_batch_sequences


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real (word-level) Hugging Face tokenizer built here: BOS 0, EOS 1, PAD 2, then the words."""
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("context_size", [2, 7, 16])
@pytest.mark.parametrize("bos", [None, 0])
@pytest.mark.parametrize("sep", [None, 0, 1])
@pytest.mark.parametrize("disable", [False, True])
def test_chunking_equals_saelens(context_size: int, bos: int | None, sep: int | None, disable: bool) -> None:
    """Token lists of random lengths (some empty, some starting with BOS or the separator already) give the
    same chunks as SAELens's ``concat_and_batch_sequences`` with ``begin_sequence_token_id=None`` (as its
    ActivationsStore calls it)."""
    saelens = _saelens_chunker()
    rng = random.Random(context_size * 7 + (bos or 5) + (sep or 9) + disable)
    seqs = []
    for _ in range(60):
        s = [rng.randint(2, 30) for _ in range(rng.choice([0, 1, 2, 5, 15, 40]))]
        if s and rng.random() < 0.2:
            s[0] = rng.choice([0, 1])
        seqs.append(s)
    ours = [
        c
        for c, _ in concat_and_chunk(
            ((s, i) for i, s in enumerate(seqs)),
            context_size,
            begin_batch_token_id=bos,
            sequence_separator_token_id=sep,
            disable_concat_sequences=disable,
        )
    ]  # noqa: E501
    theirs = saelens(
        iter(torch.tensor(s, dtype=torch.long) for s in seqs),
        context_size,
        begin_batch_token_id=bos,
        begin_sequence_token_id=None,
        sequence_separator_token_id=sep,
        disable_concat_sequences=disable,
    )
    assert ours == [t.tolist() for t in theirs]
    assert ours, "the case yields chunks"


def test_chunks_name_their_documents() -> None:
    """Each chunk lists the documents it holds tokens of, with the counts (BOS and separators not counted)."""
    chunks = list(
        concat_and_chunk([([5] * 3, "a"), ([6] * 6, "b")], 4, begin_batch_token_id=0, sequence_separator_token_id=1)
    )
    assert chunks == [([0, 5, 5, 5], [("a", 3)]), ([0, 6, 6, 6], [("b", 3)]), ([0, 6, 6, 6], [("b", 3)])]
    chunks = list(
        concat_and_chunk([([5] * 2, "a"), ([6] * 6, "b")], 6, begin_batch_token_id=0, sequence_separator_token_id=1)
    )
    assert chunks == [([0, 5, 5, 1, 6, 6], [("a", 2), ("b", 2)])]


def test_iter_sequences_on_texts_equals_saelens(tokenizer, tmp_path: Path) -> None:
    """A .jsonl corpus through :func:`iter_sequences` (BOS-prepending teacher conventions) gives SAELens's chunks
    of the same texts, tokenized without special tokens (SAELens ``to_tokens(prepend_bos=False)``)."""
    texts = _texts(80)
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    conv = resolve_conventions({}, {"context_size": 16, "prepend_bos": True})  # separator: SAELens default 'bos'
    assert (conv.prepend_bos, conv.sequence_separator_token, conv.seqpos_slice) == (True, "bos", (None,))
    ours = [ids for ids, _ in iter_sequences(tokenizer, str(f), "train", eval_fraction=0.25, seed=3, conventions=conv)]
    train = [t for i, t in enumerate(texts) if split_of(f"corpus.jsonl#{i}", 0.25, 3) == "train"]
    theirs = _saelens_chunker()(
        iter(torch.tensor(tokenizer(t, add_special_tokens=False).input_ids) for t in train),
        16,
        begin_batch_token_id=tokenizer.bos_token_id,
        sequence_separator_token_id=tokenizer.bos_token_id,
    )
    assert ours == [t.tolist() for t in theirs] and len(ours) > 10
    assert all(s[0] == tokenizer.bos_token_id for s in ours)


def test_conventions_request_teacher_default() -> None:
    """Each key: the request's value, else the teacher's, else the default; sources recorded."""
    legacy = resolve_conventions({}, {"hook_name": "blocks.3.hook_resid_post"})  # no convention at all
    assert legacy.to_dict() | {"sources": None} == {**LEGACY_DEFAULTS, "seqpos_slice": [1, None], "sources": None}
    assert set(legacy.sources.values()) == {"default"} and legacy.kept_positions == list(range(1, 128))
    gemma = {"context_size": 1024, "prepend_bos": True, "seqpos_slice": None, "exclude_special_tokens": False}
    c = resolve_conventions({"context_size": 256}, gemma)
    assert (c.context_size, c.prepend_bos, c.seqpos_slice, c.sequence_separator_token) == (256, True, (None,), "bos")
    assert c.sources == {
        "context_size": "request",
        "prepend_bos": "teacher",
        "seqpos_slice": "teacher",
        "exclude_special_tokens": "teacher",
        "sequence_separator_token": "default",
        "disable_concat_sequences": "default",
    }
    assert c.kept_positions == list(range(256))
    ours = resolve_conventions({}, {"context_size": 128, "prepend_bos": False, "position_0_dropped": True})
    assert ours.seqpos_slice == (1, None)  # this project's older teachers
    none_sep = resolve_conventions({"sequence_separator_token": "none"}, gemma)
    assert none_sep.sequence_separator_token is None and none_sep.sources["sequence_separator_token"] == "request"
    teacher_null = resolve_conventions({}, {**gemma, "sequence_separator_token": None})
    assert (
        teacher_null.sequence_separator_token is None and teacher_null.sources["sequence_separator_token"] == "teacher"
    )


@pytest.mark.parametrize(
    ("requested", "meta", "field"),
    [
        ({}, {"context_size": "1024"}, "data.ctx_len"),
        ({}, {"context_size": 10**6}, "data.ctx_len"),
        ({}, {"prepend_bos": "yes"}, "data.prepend_bos"),
        ({}, {"seqpos_slice": [1, 2, 0]}, "data.seqpos_slice"),
        ({"seqpos_slice": ["a"]}, {}, "data.seqpos_slice"),
        ({}, {"exclude_special_tokens": "all"}, "data.exclude_special_tokens"),
        ({}, {"sequence_separator_token": "cls"}, "data.sequence_separator_token"),
    ],
)
def test_bad_conventions_name_the_field(requested: dict, meta: dict, field: str) -> None:
    with pytest.raises(DataError) as e:
        resolve_conventions(requested, meta)
    assert e.value.field == field


def test_special_tokens_and_kept_rows(tokenizer) -> None:
    """exclude_special_tokens: true drops the tokenizer's BOS/EOS/PAD positions after the seqpos slice."""
    conv = ContextConventions(6, True, (1, None), True, "eos", False)
    ids = special_tokens(conv, tokenizer)
    assert (ids.bos, ids.separator, ids.excluded) == (0, 1, frozenset({0, 1, 2}))
    toks = torch.tensor([[0, 5, 1, 6, 7, 2], [0, 5, 6, 7, 8, 9]])
    resid = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    rows = kept_rows(resid, toks, conv.kept_positions, ids.excluded)
    assert [r.squeeze(1).tolist() for r in rows] == [[1.0, 3.0, 4.0], [7.0, 8.0, 9.0, 10.0, 11.0]]
    with pytest.raises(DataError) as e:
        special_tokens(ContextConventions(6, False, (None,), [10**6], None, False), tokenizer)
    assert e.value.field == "data.exclude_special_tokens"


def test_dataset_spec_kind() -> None:
    assert dataset_spec_kind("bbc-news") == "bundled"
    assert dataset_spec_kind("monology/pile-uncopyrighted") == "hub"
    assert dataset_spec_kind("upload:3d0c8a57-1f0e-4f0b-9a43-8e2f7c9d6b11") == "upload"
    assert dataset_spec_kind("/srv/data/corpus.txt") == "path"
    assert dataset_spec_kind("corpus.txt") == "path"
    with pytest.raises(DataError):
        dataset_spec_kind("https://example.com/x.txt")


def test_local_tables_and_saved_datasets(tmp_path: Path) -> None:
    """.jsonl, .parquet and a save_to_disk folder: one document per row of the text column; a missing column
    is a DataError naming data.text_column."""
    import datasets

    texts = ["alpha beta", "", "gamma", "delta epsilon"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    opts = SourceOptions(text_column="body")
    for name in ("c.jsonl", "c.parquet", "saved"):
        docs = list(iter_documents(str(tmp_path / name), opts))
        assert [d.text for d in docs] == ["alpha beta", "gamma", "delta epsilon"], name
        assert docs[1].doc_id.endswith("#2")
    with pytest.raises(DataError) as e:
        list(iter_documents(str(tmp_path / "c.parquet")))
    assert e.value.field == "data.text_column" and "body" in e.value.message


def test_hub_dataset_from_offline_cache(monkeypatch, tmp_path: Path, tokenizer) -> None:
    """A hub id read offline from a prepared datasets cache, split and revision honoured; an id not in the
    cache fails with a DataError (no network), not a crash."""
    prepare_hf_cache(
        tmp_path / "hf", "acme/tiny-news", {"train": {"text": _texts(30)}, "validation": {"text": ["val one"]}}
    )
    hf_offline(monkeypatch, tmp_path / "hf")
    docs = list(iter_documents("acme/tiny-news", SourceOptions(hf_split="validation", hf_revision="main")))
    assert [d.text for d in docs] == ["val one"]
    seqs = list(iter_sequences(tokenizer, "acme/tiny-news", "train", eval_fraction=0.2, seed=0, ctx_len=8))
    assert seqs and all(len(s) == 8 for s, _ in seqs)
    with pytest.raises(DataError) as e:
        list(iter_documents("acme/not-cached"))
    assert e.value.field == "data.dataset" and "acme/not-cached" in e.value.message


def test_pretokenized_rows(tmp_path: Path, tokenizer) -> None:
    """input_ids rows are used as they are, cut to context_size (SAELens); short rows and foreign ids refused."""
    rows = [[0, *range(4, 4 + 11)] for _ in range(6)]
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "tok.parquet")
    conv = resolve_conventions({"context_size": 8}, {"prepend_bos": True})
    seqs = [
        s
        for s, _ in iter_sequences(
            tokenizer, str(tmp_path / "tok.parquet"), "train", eval_fraction=0.01, seed=1, conventions=conv
        )
    ]  # noqa: E501
    assert seqs and all(s == rows[0][:8] for s in seqs)
    with pytest.raises(DataError) as e:
        list(iter_sequences(tokenizer, str(tmp_path / "tok.parquet"), "train", eval_fraction=0.01, seed=1, ctx_len=64))
    assert e.value.field == "data.ctx_len"
    pq.write_table(pa.table({"input_ids": [[0, 10**6, 5, 6]] * 4}), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        list(iter_sequences(tokenizer, str(tmp_path / "bad.parquet"), "train", eval_fraction=0.01, seed=1, ctx_len=4))
    assert e.value.field == "data.dataset" and "vocabulary" in e.value.message


def test_folder_of_rst_md_and_txt_files(tmp_path: Path, tokenizer) -> None:
    """A documentation tree (like the kernel's ``Documentation/``): every ``.rst`` / ``.md`` / ``.txt`` file, any
    case, found recursively, is one document (its text kept as written, markup included), in path order, with the
    relative path as its id and the parent folder as its label; other files and empty ones are skipped. The split
    is by document (seeded hash of the path), and the train and eval sequences of :func:`iter_sequences` come from
    disjoint files, the same ones on every read."""
    root = tmp_path / "Documentation"
    texts = _texts(24)
    layout = {f"sub{i % 3}/doc{i:02d}.rst": t for i, t in enumerate(texts[:20])}
    layout |= {"index.rst": texts[20], "admin/README.md": texts[21], "admin/notes.txt": texts[22]}
    layout |= {"admin/UPPER.RST": texts[23], "admin/conf.py": "the a news", "sub0/fig.svg": "<svg/>", "empty.rst": "\n"}
    for rel, text in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "PCI").mkdir()
    (root / "PCI" / "pci.rst").write_text("=====\nTitle\n=====\n\n.. note:: the *market*\n")

    docs = list(iter_documents(str(root)))
    ids = [d.doc_id for d in docs]
    want = sorted(r for r in layout if r.lower().endswith((".rst", ".md", ".txt")) and r != "empty.rst")
    assert ids == sorted([*want, "PCI/pci.rst"]) and len(ids) == 25
    assert ids[0] == "PCI/pci.rst" and "admin/UPPER.RST" in ids and "admin/conf.py" not in ids
    by_id = {d.doc_id: d for d in docs}
    assert by_id["PCI/pci.rst"].text == "=====\nTitle\n=====\n\n.. note:: the *market*"
    assert by_id["PCI/pci.rst"].label == "PCI" and by_id["index.rst"].label is None
    assert by_id["sub1/doc04.rst"].text == texts[4]

    def read(split: str) -> list[tuple[list[int], str]]:
        seqs = iter_sequences(tokenizer, str(root), split, eval_fraction=0.3, seed=5, ctx_len=8)
        return [(ids_, d.doc_id) for ids_, d in seqs]

    train, held_out = read("train"), read("eval")
    assert train and held_out and read("train") == train
    assert {d for _, d in train}.isdisjoint(d for _, d in held_out)
    assert {d for _, d in held_out} <= {i for i in ids if split_of(i, 0.3, 5) == "eval"}

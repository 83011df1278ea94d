"""Offline Hugging Face data sets for tests: the cache that ``datasets.load_dataset("org/name")`` leaves after
one online load, written here without network, and the switches that make ``datasets`` read it offline.

Layout (``datasets`` 3-5, ``datasets.packaged_modules.cache``): ``<HF_DATASETS_CACHE>/<org>___<name>/<config>/
<version>/<hash>/`` with ``dataset_info.json`` and ``<name>-<split>.arrow``. With ``HF_HUB_OFFLINE=1``,
``load_dataset("org/name", split=..., streaming=True)`` finds it there ("Using the latest cached version of the
dataset") and streams it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest


def prepare_hf_cache(cache_dir: Path, repo_id: str, splits: dict[str, dict[str, list[Any]]]) -> Path:
    """Write the ``datasets`` cache of hub data set ``repo_id`` (config ``default``) under ``cache_dir`` (a
    ``HF_DATASETS_CACHE``): ``splits`` maps split name -> columns. Returns the cached folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, cols in splits.items():
            f = Path(tmp) / f"{split}.parquet"
            pq.write_table(pa.table(cols), f)
            files[split] = str(f)
        builder = Parquet(cache_dir=str(Path(tmp) / "build"), dataset_name=name, data_files=files, hash="0" * 16)
        builder.download_and_prepare()
        dest = Path(cache_dir) / f"{org}___{name}" / "default" / "0.0.0" / ("0" * 16)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(builder.cache_dir, dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest


def hf_offline(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Make ``datasets`` (in this process, already imported or not) read ``cache_dir`` and never the network:
    ``HF_DATASETS_CACHE`` and ``HF_HUB_OFFLINE`` in the environment (for child processes) and in the libraries'
    config modules (they read the environment once, at import)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(cache_dir))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

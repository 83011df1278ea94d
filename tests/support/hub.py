"""A local Hugging Face hub cache laid out by hand, for hub-reference tests that must run offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> str:
    """Lay out ``files`` (repo path -> local file) as the hub client's cache does under ``root``:
    content-addressed blobs, a snapshot folder of symlinks for one commit, and refs/main naming that commit.

    Returns:
        The commit (a sha1 of ``repo_id``).
    """
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit

"""A local Hugging Face hub cache laid out by hand, for hub-reference tests that must run offline, and a local
hub server (:class:`FakeHub`) for the tests that read the hub's metadata or download from it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


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


class FakeHub:
    """A local HTTP stand-in for the hub (``HF_ENDPOINT``), enough for ``HfApi.model_info`` and
    ``hf_hub_download``: ``GET /api/models/<repo>[/revision/<rev>]`` lists files with sizes, ``HEAD``/``GET
    /<repo>/resolve/<rev>/<file>`` serve them (with ``X-Repo-Commit`` and ``ETag``); unknown repos answer 404
    with ``X-Error-Code: RepoNotFound`` as the hub does. A file may be declared by size only (never served), to
    describe a huge repository. ``delay`` seconds pass before each file download; ``downloads`` records them.

    Use as a context manager; ``url`` is its endpoint.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes | int]] = {}
        self.delay = 0.0
        self.downloads: list[str] = []
        self.metadata_requests = 0
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, files: dict[str, bytes | int]) -> None:
        """Publish ``repo_id`` with ``files``: repo path -> content (bytes) or declared size (int)."""
        self.repos[repo_id] = files

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def commit(self, repo_id: str) -> str:
        """The (fixed) commit of ``repo_id``."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _not_found(self, head: bool = False) -> None:
                body = json.dumps({"error": "Repository not found"}).encode()
                self._send(404, body, {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head=head)

            def _serve(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                if path.startswith("/api/models/"):
                    hub.metadata_requests += 1
                    parts = path[len("/api/models/") :].split("/")
                    repo_id = "/".join(parts[:2])
                    if repo_id not in hub.repos:
                        return self._not_found(head)
                    siblings = [
                        {"rfilename": n, "size": v if isinstance(v, int) else len(v)}
                        for n, v in hub.repos[repo_id].items()
                    ]
                    body = json.dumps({"id": repo_id, "sha": hub.commit(repo_id), "siblings": siblings}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head=head)
                parts = path.lstrip("/").split("/")
                repo_id = "/".join(parts[:2])
                if len(parts) < 5 or parts[2] != "resolve" or repo_id not in hub.repos:
                    return self._not_found(head)
                name = "/".join(parts[4:])
                data = hub.repos[repo_id].get(name)
                if not isinstance(data, bytes):
                    return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head=head)
                if not head:
                    hub.downloads.append(f"{repo_id}/{name}")
                    time.sleep(hub.delay)
                headers = {
                    "X-Repo-Commit": hub.commit(repo_id),
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "Content-Type": "application/octet-stream",
                }
                self._send(200, data, headers, head=head)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._serve(head=False)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._serve(head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

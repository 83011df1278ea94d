"""Redaction of server facts from texts a user sees: the last line of defence behind fixing each source.

Job errors, job events and problem bodies are built from our own messages, but some carry an exception's text
(a core error, a broker error, an unexpected failure), and such texts name server folders
(``/srv/rsae/uploads/<id>``, ``/tmp/tmpab12``), hosts and ports (``redis:6379``, ``10.0.0.5:5432``), URLs
with credentials and process ids. :func:`redact` replaces them with placeholders (``<path>``, ``<host>``,
``<url>``, ``<pid>``) and caps the length; the full text goes to the server log only. It never needs the
settings: any absolute POSIX path is a server path as far as a user is concerned.
"""

from __future__ import annotations

import re
import socket
from functools import lru_cache
from typing import Any

MAX_TEXT_CHARS = 2000
"""Longest user-visible message (longer ones are cut and end with '…')."""

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# An absolute (or ~ / ./ ../) POSIX path: not part of a word, a relative path ("org/name") or a URL.
_PATH = re.compile(r"(?<![\w.:/~@-])(?:~|\.{1,2})?/[^\s'\"/:,;()<>\[\]{}]+(?:/[^\s'\"/:,;()<>\[\]{}]*)*")
_ADDRESS = re.compile(
    r"(?<![\w.-])(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]|localhost)(?::\d{1,5})?(?![\w-]|\.\w)"
    r"|(?<![\w.-])[A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*:\d{2,5}(?![\w:-]|\.\w)"
)
_PID = re.compile(r"\b(pid)([ =:#]+)\d+", re.IGNORECASE)
_HOST_PID = re.compile(r"<host>:\d+(?::[0-9a-f]+)?")  # a lease owner id, host:pid:rand


@lru_cache(maxsize=1)
def _host_names() -> re.Pattern[str] | None:
    """This machine's host names (short and fully qualified) as one pattern, or None if unknown."""
    names = {n for n in (socket.gethostname(), socket.getfqdn()) if n and len(n) >= 2 and n != "localhost"}
    names |= {n.split(".", 1)[0] for n in names if len(n.split(".", 1)[0]) >= 2}
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w-])")


def clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (the cut marked with '…')."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def redact(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` without server paths, URLs, host names, addresses with ports or pids, at most ``limit`` chars.

    Cut first (so the patterns never scan a huge text), then: URLs -> ``<url>``; absolute, ``~``, ``./``
    and ``../`` paths -> ``<path>``; IPv4/IPv6 addresses, ``localhost`` and ``name:port`` -> ``<host>``;
    this machine's host name (with a ``:pid:rand`` tail: a lease owner) -> ``<host>``; ``pid 1234`` ->
    ``pid <pid>``. Relative names such as a hub id
    (``org/name``) or a field path (``settings.finetune.lr``) are kept.
    """
    text = clip(str(text), limit)
    text = _URL.sub("<url>", text)
    text = _PATH.sub("<path>", text)
    text = _ADDRESS.sub("<host>", text)
    hosts = _host_names()
    if hosts is not None:
        text = hosts.sub("<host>", text)
    text = _HOST_PID.sub("<host>", text)
    return _PID.sub(r"\1\2<pid>", text)


def redact_data(value: Any, limit: int = MAX_TEXT_CHARS) -> Any:
    """``value`` (JSON-like: dicts, lists, scalars) with every string passed through :func:`redact`; dict
    keys are kept. Used on job errors and event payloads before they are stored."""
    if isinstance(value, str):
        return redact(value, limit)
    if isinstance(value, dict):
        return {k: redact_data(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v, limit) for v in value]
    return value

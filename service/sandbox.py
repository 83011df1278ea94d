"""Run one function in a child process with bounded memory and time, so that reading an untrusted file
cannot grow the API process (a decompression bomb inflates in the child, which dies or fails alone).

The child is forked from a ``multiprocessing`` fork server (started once per API process, single-threaded,
with the heavy modules of ``preload`` imported once, so a child starts in milliseconds and never inherits
the API's threads or sockets). Before calling the function the child caps its address space with
``RLIMIT_AS`` at its current size plus ``memory_bytes`` (POSIX ``setrlimit``; Linux counts every mapping);
an allocation past it fails inside the child (``MemoryError``, or torch's "can't allocate memory"
``RuntimeError``, or an abort), and the caller gets :class:`ChildFailed` with reason ``"memory"``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import resource
import threading
from collections.abc import Callable, Sequence
from typing import Any

_CTX_LOCK = threading.Lock()
_CTX: Any = None


class ChildFailed(Exception):
    """The child gave no result: ``reason`` is ``"memory"`` (the bound was hit, or the child died, which under
    the bound is almost always an allocation failure), or ``"timeout"``; ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _context(preload: Sequence[str]) -> Any:
    """The fork-server context (spawn where there is no fork server), its preload set once."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            methods = multiprocessing.get_all_start_methods()
            _CTX = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                _CTX.set_forkserver_preload(list(preload))
        return _CTX


def _vm_size() -> int:
    """This process's current address space in bytes (``VmSize`` of ``/proc/self/status``; 0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def limit_address_space(extra_bytes: int) -> int:
    """Cap this process's address space (``RLIMIT_AS``) at its current size plus ``extra_bytes`` (never above an
    existing hard limit). Returns the new soft limit in bytes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _is_alloc_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and ("alloc" in text or "out of memory" in text))


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], memory_bytes: int) -> None:
    """Child entry point: bound the memory, call ``fn(*args)``, send ``("ok", result)``, ``("memory", text)``
    or ``("raise", exception)`` back."""
    try:
        limit_address_space(memory_bytes)
        out: tuple[str, Any] = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which decides
        if _is_alloc_failure(e):
            out = ("memory", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            try:
                pickle.dumps(e)
                out = ("raise", e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                out = ("raise", RuntimeError(f"{type(e).__name__}: {e}"))
    try:
        conn.send(out)
    except MemoryError:
        conn.send(("memory", "MemoryError while sending the result"))
    finally:
        conn.close()


def run_bounded(
    fn: Callable[..., Any],
    *args: Any,
    memory_bytes: int,
    timeout: float,
    preload: Sequence[str] = (),
) -> Any:
    """``fn(*args)`` in a child process whose address space may grow by at most ``memory_bytes``.

    Args:
        fn: a module-level function (it is pickled by reference); its result and exceptions must pickle.
        memory_bytes: bytes of address space the child may add to what it starts with (``RLIMIT_AS``).
        timeout: seconds before the child is killed.
        preload: modules the fork server imports once (e.g. the module of ``fn``, which imports torch); only
            the first call of the process sets them.

    Returns:
        What ``fn`` returned.

    Raises:
        ChildFailed: ``"memory"`` (allocation failed, or the child died without answering) or ``"timeout"``.
        Exception: whatever ``fn`` raised, re-raised here.
    """
    ctx = _context(preload)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, memory_bytes), daemon=True)
    proc.start()
    sender.close()
    grace = 5.0  # seconds a child that answered (or died) gets to exit before it is killed
    try:
        if not receiver.poll(timeout):
            grace = 0.0
            raise ChildFailed("timeout", f"no result after {timeout:g} s")
        try:
            kind, value = receiver.recv()
        except (EOFError, OSError):
            proc.join(grace)
            raise ChildFailed("memory", f"the child died without a result (exit code {proc.exitcode})") from None
    finally:
        receiver.close()
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if kind == "ok":
        return value
    if kind == "memory":
        raise ChildFailed("memory", value)
    raise value

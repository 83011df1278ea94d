"""The Celery task ``rsae.encode``, served by the long-lived encode worker (``rsae-service encode-worker``).

Thin: it resolves the payload's files (:func:`service.encode.resolve_under`), takes the host model and the SAEs
from this process's caches (:class:`EncodeCache`), calls :mod:`rsae.encode` and pushes the answer to the request's
reply list (protocol: :mod:`service.encode`). The caches live in the pool process, which the encode app never
recycles (:mod:`worker.encode_app`): host models in an LRU of ``encode_cache_models`` entries keyed by the model
spec; SAEs in an LRU bounded by ``encode_cache_saes`` entries and ``encode_cache_sae_bytes`` bytes of tensors, keyed
by (folder, sha256 of the weights as the database records them), so a re-uploaded or re-published SAE is loaded
afresh. torch and transformers are imported inside the task only (never in the prefork parent).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis
from cachetools import LRUCache
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from rsae.errors import RSAEError
from service.config import Settings, get_settings
from service.encode import resolve_under, too_large
from service.problems import ProblemError
from service.queue import TASK_ENCODE

log = logging.getLogger(__name__)


class EncodeCache:
    """This process's loaded host models and SAEs (least recently used dropped first).

    Args:
        settings: ``encode_cache_models``, ``encode_cache_saes``, ``encode_cache_sae_bytes``.
        device: torch device the models and SAEs are moved to.
    """

    def __init__(self, settings: Settings, device: str) -> None:
        self.device = device
        self.models: LRUCache = LRUCache(maxsize=settings.encode_cache_models)
        self.saes: LRUCache = LRUCache(maxsize=settings.encode_cache_sae_bytes, getsizeof=lambda v: v[1])
        self.max_saes = settings.encode_cache_saes
        self.lock = threading.Lock()
        self.loads = {"models": 0, "saes": 0}

    def model(self, spec: str):
        """``(model, tokenizer)`` of ``spec`` (:func:`rsae.models.load_model`), loaded once."""
        from rsae.models import load_model

        with self.lock:
            hit = self.models.get(spec)
            if hit is None:
                hit = load_model(spec, self.device)
                self.models[spec] = hit
                self.loads["models"] += 1
                log.info("encode cache: loaded host model %s on %s", spec, self.device)
            return hit

    def sae(self, folder, sha256: str):
        """The SAE in ``folder`` (:func:`rsae.saes.load_sae`), keyed by ``(folder, sha256)``."""
        from rsae.saes import load_sae

        key = (str(folder), sha256)
        with self.lock:
            hit = self.saes.get(key)
            if hit is None:
                sae = load_sae(folder).to(self.device)
                size = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
                hit = (sae, size)
                if size <= self.saes.maxsize:
                    self.saes[key] = hit
                    while len(self.saes) > self.max_saes:
                        self.saes.popitem()
                self.loads["saes"] += 1
                log.info("encode cache: loaded SAE %s (sha256 %s, %d bytes)", folder.name, sha256[:12], size)
            return hit[0]


_cache: EncodeCache | None = None


def cache(settings: Settings) -> EncodeCache:
    """The process's :class:`EncodeCache` (made on first use, after the fork, on :func:`rsae.device.pick_device`)."""
    global _cache
    if _cache is None:
        from rsae.device import pick_device

        _cache = EncodeCache(settings, pick_device())
    return _cache


def run_encode(payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The API's result of one encode payload (:mod:`service.encode`).

    Raises:
        ProblemError: 413 ``input_too_large`` (``text``: more than ``max_tokens`` tokens); 404 ``file_missing``.
        RSAEError: the core's errors (a site the model lacks, widths that differ, bad conventions), with a field.
    """
    import torch

    from rsae.encode import count_tokens, encode_rows, encode_texts, site_of_artifacts, site_of_teacher

    c = cache(settings)
    saes = {
        name: c.sae(resolve_under(settings, ref["root"], ref["path"]), ref["sha256"])
        for name, ref in payload["saes"].items()
    }
    if payload.get("site") is not None:
        site = site_of_artifacts(resolve_under(settings, **payload["site"]), model=payload.get("model"))
    else:
        site = site_of_teacher(saes["teacher"], model=payload.get("model"), hook=payload.get("hook"))
    out: dict[str, Any] = {"model": site.model, "hook_name": site.hook, "top_k": payload["top_k"]}
    out |= {"saes": list(saes), "conventions": None, "texts": None, "rows": None}
    if payload.get("activations") is not None:
        x = torch.tensor(payload["activations"], dtype=torch.float32)
        rows = encode_rows(saes, x, payload["top_k"])
        out["rows"] = [{"latents": {n: rows[n][i] for n in saes}} for i in range(x.shape[0])]
        return out
    model, tokenizer = c.model(site.model)
    n = count_tokens(tokenizer, payload["texts"], site.conventions)
    if n > payload["max_tokens"]:
        raise too_large("text", f"the texts make {n} tokens; at most {payload['max_tokens']} per request")
    out["conventions"] = site.conventions.to_dict()
    out["texts"] = encode_texts(model, tokenizer, saes, payload["texts"], site, payload["top_k"])
    return out


_redis_client: redis.Redis | None = None


def _reply(settings: Settings, key: str, message: dict[str, Any]) -> None:
    """Push ``message`` to the reply list ``key``, which expires once the API stopped waiting."""
    global _redis_client
    if _redis_client is None:
        _redis_client = redis.Redis.from_url(settings.require_broker(), socket_timeout=10)
    ttl = int(settings.encode_start_timeout_seconds + settings.encode_timeout_seconds + 60)
    with _redis_client.pipeline() as pipe:
        pipe.rpush(key, json.dumps(message)).expire(key, ttl).execute()


def _problem(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ProblemError):
        return {"status": e.status, "code": e.code, "detail": e.detail, "field": e.field}
    if isinstance(e, RSAEError):
        return {"status": 422, "code": e.code, "detail": e.message, "field": e.field}
    if isinstance(e, SoftTimeLimitExceeded):
        return {"status": 504, "code": "encode_timeout", "detail": "the encode worker ran out of time", "field": None}
    return {"status": 500, "code": "encode_failed", "detail": "encoding failed; see the encode worker's log"}


@shared_task(name=TASK_ENCODE, ignore_result=True)
def encode(payload: dict[str, Any], reply: str) -> None:
    """Encode one request and answer on ``reply`` (``started``, then ``done`` with the result or ``error`` with a
    problem). Errors never escape: the API is waiting for an answer."""
    settings = get_settings()
    _reply(settings, reply, {"state": "started"})
    try:
        message = {"state": "done", "result": run_encode(payload, settings)}
    except Exception as e:  # noqa: BLE001 - every failure is answered (ProblemError, RSAEError, the rest)
        if not isinstance(e, (ProblemError, RSAEError)):
            log.exception("encode request failed")
        message = {"state": "error", "problem": _problem(e)}
    _reply(settings, reply, message)

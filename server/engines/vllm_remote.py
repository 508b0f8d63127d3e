"""A remote ``vllm serve`` (vLLM 0.32's OpenAI server) behind alignd's :class:`Engine` interface.

Everything goes over vLLM's own HTTP API, so any stock ``vllm serve`` works (another GPU, another node,
a load balancer in front of several replicas):

========================  ==========================================================================
alignd                    vLLM route
========================  ==========================================================================
start / health            ``GET /health`` (200 when the engine lives), ``GET /v1/models`` (max_model_len)
``generate``              ``POST /v1/completions``: ``prompt`` as token ids, ``stream: true``,
                          ``return_token_ids``, ``return_tokens_as_token_ids`` (``token_id:123`` keys);
                          with ``prompt_logprobs`` one non-streamed answer (vLLM refuses them streamed)
``Session.view``          ``/v1/completions`` with ``max_tokens: 1`` and the wanted log-probabilities
``generate_block``        ``/v1/completions``, not streamed, one view per generated token
``score``                 ``/v1/completions`` with ``prompt_logprobs`` (plus the next-token view)
``reward``                ``POST /classify`` with ``use_activation: false`` (the raw score), on a server
                          started with ``--runner pooling``
========================  ==========================================================================

Views: top-k via ``logprobs: k``; chosen ids via vLLM's ``logprob_token_ids`` (at most 128; if the remote
ignores the field, which older servers do, the engine notices the missing ids and falls back for good);
the whole vocabulary, and top-k together with chosen ids, via ``logprobs: -1`` filtered here. Full views
need the remote started with ``--max-logprobs -1`` and send vocabulary-sized JSON per position: correct,
never fast. ``prompt_logprobs`` has no start offset nor chosen-id form over HTTP, so :meth:`score` asks
for every prompt position (``-1`` for chosen ids) and keeps the asked-for ones.

HTTP has no streaming input, so a session resubmits its whole context each step; vLLM's prefix cache
(on by default) keeps the cost near one decode step plus the re-prefilled unfinished cache block.

Model facts: ``max_model_len`` from the remote's ``/v1/models`` (the smaller of it and the config's
``max_model_len``); vocabulary size and EOS ids from the checkpoint config at ``settings.path`` (a local
folder's ``config.json``, else ``transformers.AutoConfig`` for a hub id: the gateway loads that model's
tokenizer from the same path anyway). Only if neither can be read is the vocabulary size probed from the
remote (the length of a full-vocabulary row); the EOS ids are then left to the tokenizer's.

Failures: connection errors, a dropped connection before any answer, and 502/503/504 are retried with
exponential backoff; nothing else is. After the retries the call raises :class:`EngineUnavailable` (the
API answers 503) and the engine turns not ``ready`` until a health probe succeeds again (a background task
probes ``/health`` every ``health_interval`` seconds, every second while down). A 400/413/422 becomes
:class:`InvalidEngineRequest` with the ``param`` the remote named; other statuses become
:class:`EngineUnavailable`. Cancelling a call closes its HTTP connection, and vLLM aborts a request whose
client disconnected.

Client options: a remote model's engine arguments belong to its own server, so the ``vllm:`` map of an
``engine: remote`` model holds the fields of :class:`RemoteOptions` instead (unknown keys are an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from alignd.decoders.contract import GeneratedBlock, GenerateOp, ScoreOp, StepView, ViewSpec
from alignd.server.engines.base import (
    ChoiceDelta,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationUpdate,
    InvalidEngineRequest,
    ModelInfo,
    SamplingSpec,
    Session,
    StructuredSpec,
    TokenLogprob,
    derive_view,
)
from alignd.server.settings import ModelSettings

__all__ = ["RemoteOptions", "RemoteVLLMEngine", "parse_token_id"]

log = logging.getLogger(__name__)

MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on `logprob_token_ids`
_RETRY_STATUSES = frozenset({502, 503, 504})
_INVALID_STATUSES = frozenset({400, 413, 422})
# Failures before any answer arrived: the request cannot have produced output, so resending is safe
# (a stale pooled connection shows up as RemoteProtocolError or ReadError).
_TRANSIENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
_TOKEN_ID = re.compile(r"^\s*token_id:(\d+)\s*$")
_CLAMPED = -9999.0  # vLLM's completions API writes -inf as this


@dataclass(frozen=True)
class RemoteOptions:
    """How the gateway talks to one remote vLLM server (the ``vllm:`` map of an ``engine: remote`` model)."""

    start_timeout: float = 600.0
    """Seconds :meth:`RemoteVLLMEngine.start` waits for the remote to answer before giving up."""
    connect_timeout: float = 5.0
    """Seconds to open a connection."""
    request_timeout: float = 600.0
    """Seconds to wait for an answer, or for the next chunk of a streamed one."""
    health_timeout: float = 5.0
    """Seconds a ``/health`` probe may take."""
    health_interval: float = 5.0
    """Seconds between background ``/health`` probes (1 s while the remote is down); 0 turns them off."""
    retries: int = 3
    """How often a transient failure is retried."""
    backoff: float = 0.25
    """Delay before the first retry, in seconds; doubled per retry, with up to 25% jitter."""
    backoff_max: float = 4.0
    """Upper bound of one retry delay."""
    max_connections: int = 64
    """Connections kept to the remote (each streamed generation holds one)."""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RemoteOptions:
        """Options from a config map; unknown keys raise ``ValueError`` naming them and the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for a remote engine: its `vllm:` map holds client "
                f"options ({', '.join(sorted(known))}); engine arguments go on the remote `vllm serve` command"
            )
        return cls(**dict(raw))


def parse_token_id(key: str | int, *, plain: bool = False) -> int | None:
    """The token id in a logprobs key: ``token_id:123`` (``return_tokens_as_token_ids``), or an int.

    ``plain`` also accepts a bare decimal string, as ``prompt_logprobs`` keys are; it must stay off for
    completion logprobs keys, where a bare ``"123"`` is the text of a token, not its id.
    """
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    match = _TOKEN_ID.match(key)
    if match:
        return int(match.group(1))
    if plain and key.strip().isdigit():
        return int(key)
    return None


def _logprob(value: Any) -> float:
    """A log-probability from JSON: ``null`` and vLLM's ``-9999.0`` clamp mean ``-inf``."""
    if value is None:
        return -math.inf
    lp = float(value)
    return -math.inf if lp <= _CLAMPED else lp


def _pairs(position: Mapping[str, Any] | None, *, plain: bool = False) -> dict[int, float]:
    """One position's ``{key: logprob}`` (or ``{key: {"logprob": ...}}``) as ``{token id: logprob}``."""
    out: dict[int, float] = {}
    for key, value in (position or {}).items():
        tid = parse_token_id(key, plain=plain)
        if tid is None:
            raise EngineUnavailable(
                f"the remote returned a log-probability keyed {key!r}, not a token id: it must be a vLLM "
                "server that honours `return_tokens_as_token_ids` (vLLM >= 0.6)"
            )
        out[tid] = _logprob(value.get("logprob") if isinstance(value, Mapping) else value)
    return out


def _view(pairs: Mapping[int, float], want: ViewSpec, vocab_size: int) -> StepView:
    """A decoder's view of one position: dense for ``full``, else the asked-for ids, most likely first."""
    if want.full:
        dense = np.full(vocab_size, -np.inf)
        for tid, lp in pairs.items():
            if tid < vocab_size:
                dense[tid] = lp
        return StepView(logprobs=dense)
    items = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    if want.token_ids:
        keep = set(want.token_ids)
        top = {tid for tid, _ in items[: want.top_k]} if want.top_k else set()
        items = [kv for kv in items if kv[0] in keep or kv[0] in top]
    elif want.top_k:
        items = items[: want.top_k]
    return StepView(
        logprobs=np.array([lp for _, lp in items], dtype=np.float64),
        token_ids=np.array([tid for tid, _ in items], dtype=np.int64),
    )


def _error_fields(body: bytes) -> tuple[str, str | None]:
    """Message and param of an error body: OpenAI's ``{"error": {...}}``, vLLM's older flat form, FastAPI's."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")[:500] or "no message", None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            param = err.get("param")
            return str(err["message"]), str(param) if param else None
        detail = data.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            loc = [str(p) for p in detail[0].get("loc", ()) if p != "body"]
            return str(detail[0].get("msg", detail)), ".".join(loc) or None
        if detail is not None:
            return str(detail), None
    return str(data)[:500], None


def _structured(spec: StructuredSpec) -> dict[str, Any]:
    kind, value = spec.kind, spec.value
    body: dict[str, Any] = {"json_object": True} if kind == "json_object" else {kind: value}
    # As the in-process engine configures vLLM: compact JSON ends where the model wants it to.
    body["disable_any_whitespace"] = True
    return body


def _token_logprobs(token_ids: Sequence[int], logprobs: Mapping[str, Any], k: int) -> list[TokenLogprob]:
    """Completion-API logprobs of generated tokens as :class:`TokenLogprob` (top ``k`` alternatives)."""
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    if len(values) != len(token_ids):
        raise EngineUnavailable(f"the remote sent {len(values)} log-probabilities for {len(token_ids)} tokens")
    out = []
    for j, tid in enumerate(token_ids):
        pairs = _pairs(tops[j]) if j < len(tops) else {}
        top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:k] if k > 0 else []
        out.append(TokenLogprob(int(tid), _logprob(values[j]), top))
    return out


def _read_config(path: str) -> dict[str, Any] | None:
    """The checkpoint's config as a dict: ``config.json`` in a local folder, else AutoConfig (hub id)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
        return dict(json.loads(file.read_text())) if file.is_file() else None
    try:
        from transformers import AutoConfig

        return dict(AutoConfig.from_pretrained(path).to_dict())
    except Exception as exc:  # noqa: BLE001 - offline, gated or not a transformers model
        log.info("cannot read the config of %s locally (%s); asking the remote", path, exc)
        return None


def _config_facts(config: Mapping[str, Any]) -> tuple[int | None, frozenset[int]]:
    """Vocabulary size and EOS ids from a config dict, looking into ``text_config`` as vLLM does."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
    vocab = config.get("vocab_size") or (text or {}).get("vocab_size")
    eos: set[int] = set()
    for source in (config.get("eos_token_id"), (text or {}).get("eos_token_id")):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(x) for x in source)
    return (int(vocab) if vocab else None), frozenset(eos)


class _RemoteSession(Session):
    """A decoder session over HTTP: each step resubmits the context (the remote's prefix cache reuses it)."""

    def __init__(self, engine: RemoteVLLMEngine, request_id: str) -> None:
        self._engine = engine
        self._request_id = request_id
        self._last: tuple[tuple[int, ...], ViewSpec, StepView] | None = None

    async def view(self, context: Sequence[int], want: ViewSpec) -> StepView:
        key = tuple(context)
        if self._last is not None and self._last[0] == key:
            derived = derive_view(self._last[1], self._last[2], want)
            if derived is not None:
                return derived
        view = await self._engine._next_view(self._request_id, key, want)
        self._last = (key, want, view)
        return view

    async def close(self) -> None:
        self._last = None


class RemoteVLLMEngine(Engine):
    """One hosted model served by a remote ``vllm serve``, reached over HTTP with pooled connections."""

    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        *,
        options: RemoteOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not settings.url:
            raise ValueError(f"model {name!r}: a remote engine needs `url`")
        self.name = name
        self.settings = settings
        self.options = options or RemoteOptions.from_mapping(settings.vllm)
        url = settings.url.rstrip("/")
        self.base_url = url.removesuffix("/v1")
        self.served_name = settings.served_name or settings.path
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._started = False
        self._healthy = False
        self._counter = 0
        self._token_ids_ok = True  # whether the remote honours `logprob_token_ids`

    # ---- life cycle --------------------------------------------------------------------------------

    def _new_client(self) -> httpx.AsyncClient:
        o = self.options
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(o.request_timeout, connect=o.connect_timeout, pool=o.request_timeout),
            limits=httpx.Limits(max_connections=o.max_connections, max_keepalive_connections=o.max_connections),
            transport=self._transport,
        )

    async def start(self) -> None:
        """Wait (at most ``start_timeout``) until the remote answers, then read the model's facts."""
        self._client = self._client or self._new_client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.start_timeout
        delay = 0.2
        while True:
            try:
                await self._ping()
                models = await self._request("GET", "/v1/models", retry=False)
                break
            except EngineUnavailable as exc:
                if loop.time() + delay > deadline:
                    raise EngineUnavailable(
                        f"model {self.name!r}: the vLLM server at {self.base_url} did not answer within "
                        f"{self.options.start_timeout:g}s ({exc})"
                    ) from exc
                log.info("waiting for the vLLM server of %s at %s: %s", self.name, self.base_url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        cards = {str(c.get("id")): c for c in models.get("data", []) if isinstance(c, dict)}
        card = cards.get(self.served_name)
        if card is None:
            raise EngineUnavailable(
                f"model {self.name!r}: the vLLM server at {self.base_url} serves {sorted(cards)}, not "
                f"{self.served_name!r} (set `served_name` to the remote's --served-model-name)"
            )
        remote_len = card.get("max_model_len")
        lengths = [int(x) for x in (remote_len, self.settings.max_model_len) if x]
        if not lengths:
            raise EngineUnavailable(f"model {self.name!r}: the remote does not say its max_model_len; set it")
        config = await asyncio.to_thread(_read_config, self.settings.path)
        vocab, eos = _config_facts(config) if config else (None, frozenset())
        if vocab is None and self.settings.task == "generate":
            vocab = await self._probe_vocab_size()
        self.info = ModelInfo(
            name=self.name,
            vocab_size=int(vocab or 0),
            max_model_len=min(lengths),
            eos_token_ids=eos,
            task=self.settings.task,
        )
        self._started = True
        if self.options.health_interval > 0:
            self._monitor = asyncio.create_task(self._watch(), name=f"alignd-health-{self.name}")

    async def _probe_vocab_size(self) -> int:
        body = {"prompt": [0], "max_tokens": 1, "temperature": 0.0, "logprobs": -1,
                "return_tokens_as_token_ids": True}
        try:
            data = await self._completion("probe", body)
        except InvalidEngineRequest as exc:
            raise EngineUnavailable(
                f"model {self.name!r}: cannot learn the vocabulary size (no readable config at "
                f"{self.settings.path!r}, and the remote refuses full-vocabulary logprobs: start it with "
                f"--max-logprobs -1): {exc}"
            ) from exc
        return len(data["choices"][0]["logprobs"]["top_logprobs"][0])

    async def shutdown(self) -> None:
        self._started = False
        self._healthy = False
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def ready(self) -> bool:
        return self._started and self._healthy

    async def check_health(self) -> None:
        if not self._started:
            raise EngineUnavailable(f"model {self.name!r} is not ready")
        await self._ping()

    async def _ping(self) -> None:
        """``GET /health`` once, no retries; records the outcome in :attr:`ready`."""
        assert self._client is not None
        try:
            resp = await self._client.get("/health", timeout=self.options.health_timeout)
        except httpx.HTTPError as exc:
            self._healthy = False
            raise EngineUnavailable(
                f"model {self.name!r}: the vLLM server at {self.base_url} is unreachable "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if resp.status_code != 200:
            self._healthy = False
            raise EngineUnavailable(
                f"model {self.name!r}: the vLLM server at {self.base_url} is unhealthy ({resp.status_code})"
            )
        self._healthy = True

    async def _watch(self) -> None:
        interval = self.options.health_interval
        while True:
            await asyncio.sleep(interval if self._healthy else min(1.0, interval))
            with contextlib.suppress(EngineUnavailable):
                await self._ping()

    # ---- HTTP --------------------------------------------------------------------------------------

    def _rid(self, request_id: str) -> str:
        self._counter += 1
        return f"{request_id}-{self.name}-{self._counter}"

    def _delay(self, attempt: int) -> float:
        o = self.options
        base = min(o.backoff * (2**attempt), o.backoff_max)
        return base * (1.0 + 0.25 * random.random())

    def _status_error(self, status: int, body: bytes) -> EngineError:
        message, param = _error_fields(body)
        if status in _INVALID_STATUSES:
            return InvalidEngineRequest(message, param)
        return EngineUnavailable(f"model {self.name!r}: the vLLM server answered {status}: {message}")

    async def _send(
        self, method: str, path: str, body: Any = None, *, rid: str | None = None, stream: bool = False,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request, retrying transient failures; returns a 2xx response (open if ``stream``)."""
        if self._client is None:
            raise EngineUnavailable(f"model {self.name!r} is not started")
        headers = {"X-Request-Id": rid} if rid else None
        attempts = 1 + (self.options.retries if retry else 0)
        problem = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            request = self._client.build_request(method, path, json=body, headers=headers)
            try:
                resp = await self._client.send(request, stream=stream)
            except _TRANSIENT as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            except httpx.TimeoutException as exc:  # slow, not gone: resending would only add load
                raise EngineUnavailable(
                    f"model {self.name!r}: the vLLM server at {self.base_url} timed out ({type(exc).__name__})"
                ) from exc
            except httpx.HTTPError as exc:
                raise EngineUnavailable(f"model {self.name!r}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code < 400:
                self._healthy = True
                return resp
            content = await resp.aread()
            await resp.aclose()
            if resp.status_code in _RETRY_STATUSES:
                problem = f"HTTP {resp.status_code}: {_error_fields(content)[0]}"
                continue
            raise self._status_error(resp.status_code, content)
        self._healthy = False
        raise EngineUnavailable(
            f"model {self.name!r}: the vLLM server at {self.base_url} is unavailable after {attempts} "
            f"attempt(s) ({problem})"
        )

    async def _request(self, method: str, path: str, body: Any = None, *, rid: str | None = None,
                       retry: bool = True) -> dict[str, Any]:
        resp = await self._send(method, path, body, rid=rid, retry=retry)
        try:
            data = resp.json()
        except ValueError as exc:
            raise EngineUnavailable(f"model {self.name!r}: the vLLM server sent no JSON on {path}") from exc
        if not isinstance(data, dict):
            raise EngineUnavailable(f"model {self.name!r}: unexpected answer on {path}: {str(data)[:200]}")
        return data

    async def _completion(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed ``/v1/completions`` call for this model."""
        full = {"model": self.served_name, "add_special_tokens": False, "return_token_ids": True, **body}
        data = await self._request("POST", "/v1/completions", full, rid=self._rid(request_id))
        if not data.get("choices"):
            raise EngineUnavailable(f"model {self.name!r}: the vLLM server sent no choices")
        return data

    async def _events(self, resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """The JSON events of an SSE answer, up to ``[DONE]``; an error event raises."""
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if isinstance(event, dict) and isinstance(event.get("error"), dict):
                    err = event["error"]
                    code = err.get("code")
                    status = code if isinstance(code, int) else 500
                    raise self._status_error(status, json.dumps({"error": err}).encode())
                yield event
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise EngineUnavailable(
                f"model {self.name!r}: the stream from the vLLM server broke ({type(exc).__name__}: {exc})"
            ) from exc

    # ---- views ---------------------------------------------------------------------------------------

    def _view_fields(self, want: ViewSpec) -> tuple[dict[str, Any], bool]:
        """The completion fields that return ``want`` per generated position, and whether that is the
        whole vocabulary (to be filtered here)."""
        ids = sorted(set(want.token_ids))
        if want.full or (ids and (want.top_k or len(ids) > MAX_LOGPROB_TOKEN_IDS or not self._token_ids_ok)):
            return {"logprobs": -1}, True
        if ids:
            return {"logprobs": len(ids), "logprob_token_ids": ids}, False
        return {"logprobs": max(1, want.top_k)}, False

    def _views(self, choice: Mapping[str, Any], want: ViewSpec) -> list[StepView]:
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        return [_view(_pairs(position), want, self.info.vocab_size) for position in tops]

    def _lacks_ids(self, choice: Mapping[str, Any], want: ViewSpec) -> bool:
        """Whether a ``logprob_token_ids`` answer misses asked-for ids (the remote ignored the field)."""
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        asked = set(want.token_ids)
        return any(not asked <= _pairs(position).keys() for position in tops)

    async def _with_views(self, request_id: str, body: dict[str, Any], want: ViewSpec) -> dict[str, Any]:
        """A completion whose generated positions carry ``want`` (falling back to full rows if needed)."""
        fields_, _ = self._view_fields(want)
        data = await self._completion(request_id, {**body, **fields_})
        if "logprob_token_ids" in fields_ and self._lacks_ids(data["choices"][0], want):
            log.warning("the vLLM server of %s ignores logprob_token_ids; using full-vocabulary rows", self.name)
            self._token_ids_ok = False
            data = await self._completion(request_id, {**body, "logprobs": -1})
        return data

    async def _next_view(self, request_id: str, context: tuple[int, ...], want: ViewSpec) -> StepView:
        body = {"prompt": list(context), "max_tokens": 1, "temperature": 0.0, "return_tokens_as_token_ids": True}
        data = await self._with_views(request_id, body, want)
        views = self._views(data["choices"][0], want)
        if not views:
            raise EngineUnavailable(f"model {self.name!r}: the vLLM server returned no log-probabilities")
        return views[-1]

    # ---- the Engine interface ----------------------------------------------------------------------

    def _sampling_body(self, prompt_ids: list[int], spec: SamplingSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(prompt_ids),
            "max_tokens": spec.max_tokens,
            "n": spec.n,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "top_k": max(0, spec.top_k),
            "min_p": spec.min_p,
            "stop": list(spec.stop),
            "stop_token_ids": list(spec.stop_token_ids),
            "ignore_eos": spec.ignore_eos,
            "presence_penalty": spec.presence_penalty,
            "frequency_penalty": spec.frequency_penalty,
            "repetition_penalty": spec.repetition_penalty,
            "skip_special_tokens": spec.skip_special_tokens,
            "return_tokens_as_token_ids": True,
        }
        if spec.seed is not None:
            body["seed"] = spec.seed
        if spec.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in spec.logit_bias.items()}
        if spec.logprobs is not None:
            body["logprobs"] = spec.logprobs
        if spec.prompt_logprobs is not None:
            body["prompt_logprobs"] = spec.prompt_logprobs
        if spec.structured is not None:
            body["structured_outputs"] = _structured(spec.structured)
        return body

    def _delta(self, choice: Mapping[str, Any], spec: SamplingSpec) -> ChoiceDelta:
        token_ids = [int(t) for t in (choice.get("token_ids") or [])]
        lps = None
        if spec.logprobs is not None and choice.get("logprobs"):
            lps = _token_logprobs(token_ids, choice["logprobs"], spec.logprobs)
        return ChoiceDelta(
            index=int(choice.get("index", 0)),
            token_ids=token_ids,
            text=str(choice.get("text") or ""),
            logprobs=lps,
            finish_reason=choice.get("finish_reason"),
            stop_reason=choice.get("stop_reason"),
        )

    def _prompt_logprobs(self, prompt_ids: list[int], raw: Any, k: int) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None]
        for tid, position in zip(prompt_ids[1:], list(raw or [])[1:]):
            pairs = _pairs(position, plain=True)
            top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:k] if k > 0 else []
            out.append(TokenLogprob(tid, pairs.get(tid, -math.inf), top))
        return out

    async def generate(
        self, request_id: str, prompt_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerationUpdate]:
        if not self._started:
            raise EngineUnavailable(f"model {self.name!r} is not ready")
        body = self._sampling_body(prompt_ids, spec)
        if spec.prompt_logprobs is not None:
            # vLLM refuses prompt_logprobs on a streamed completion: one whole answer instead.
            data = await self._completion(request_id, body)
            choices = [self._delta(c, spec) for c in data["choices"]]
            prompt_lps = self._prompt_logprobs(
                prompt_ids, data["choices"][0].get("prompt_logprobs"), spec.prompt_logprobs
            )
            yield GenerationUpdate(choices, list(prompt_ids), prompt_lps, finished=True)
            return
        body.update(model=self.served_name, add_special_tokens=False, return_token_ids=True, stream=True)
        resp = await self._send("POST", "/v1/completions", body, rid=self._rid(request_id), stream=True)
        try:
            done: set[int] = set()
            async for event in self._events(resp):
                choices = [self._delta(c, spec) for c in event.get("choices") or []]
                if not choices:
                    continue
                done.update(c.index for c in choices if c.finish_reason is not None)
                yield GenerationUpdate(choices, list(prompt_ids), None, finished=len(done) >= spec.n)
        finally:
            # Closing mid-stream drops the connection; vLLM aborts the request when its client leaves.
            await resp.aclose()

    def open_session(self, request_id: str) -> Session:
        return _RemoteSession(self, request_id)

    async def generate_block(self, request_id: str, op: GenerateOp) -> GeneratedBlock:
        s = op.sampling
        body: dict[str, Any] = {
            "prompt": list(op.context),
            "max_tokens": op.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": max(0, s.top_k),
            "min_p": s.min_p,
            "stop_token_ids": list(op.stop_token_ids),
            "return_tokens_as_token_ids": True,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        data = await self._with_views(request_id, body, op.want)
        choice = data["choices"][0]
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        return GeneratedBlock(
            token_ids=token_ids,
            views=self._views(choice, op.want),
            finished=choice.get("finish_reason") == "stop",
        )

    async def score(self, request_id: str, op: ScoreOp) -> list[StepView]:
        if op.start < 1 or op.start > len(op.context):
            raise InvalidEngineRequest(f"score start {op.start} outside 1..{len(op.context)}")
        want = op.want
        rows = -1 if want.full or want.token_ids else max(1, want.top_k)
        body = {
            "prompt": list(op.context),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": rows,
            "return_tokens_as_token_ids": True,
        }
        data = await self._with_views(request_id, body, want)
        choice = data["choices"][0]
        prompt = list(choice.get("prompt_logprobs") or [])
        if len(prompt) != len(op.context):
            raise EngineUnavailable(
                f"model {self.name!r}: the vLLM server sent {len(prompt)} prompt rows for {len(op.context)} tokens"
            )
        views = [_view(_pairs(prompt[i], plain=True), want, self.info.vocab_size)
                 for i in range(op.start, len(op.context))]
        last = self._views(choice, want)
        if not last:
            raise EngineUnavailable(f"model {self.name!r}: the vLLM server returned no log-probabilities")
        return [*views, last[-1]]

    async def reward(self, request_id: str, texts: list[str]) -> list[float]:
        if not texts:
            return []
        body = {"model": self.served_name, "input": list(texts), "use_activation": False}
        data = await self._request("POST", "/classify", body, rid=self._rid(request_id))
        items = sorted(data.get("data") or [], key=lambda d: int(d.get("index", 0)))
        if len(items) != len(texts):
            raise EngineUnavailable(f"model {self.name!r}: /classify returned {len(items)} scores for {len(texts)}")
        return [float(item["probs"][0]) for item in items]

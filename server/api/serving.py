"""Completions and chat completions: request to generation to OpenAI response, streamed or whole.

One pipeline serves both endpoints and both kinds of target:

1. resolve ``model`` (+ ``alignment``) to a plain model or a recipe (:mod:`alignd.server.router`);
2. build the prompt token ids (chat template or prompt format; raw prompt for completions) and check
   them against the context length (never clamped silently);
3. start the generations: vLLM's native decoding for a plain model, the decoder loop for a recipe;
4. turn the :class:`ChoiceEvent` stream into an OpenAI response or SSE chunks (``data: [DONE]`` last).

A client that disconnects cancels the streaming response, which cancels the generation tasks, which abort
their engine requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from alignd.server.api.errors import APIError, BadRequest, ContextLengthExceeded, ServiceUnavailable
from alignd.server.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from alignd.server.engines.base import (
    EngineUnavailable,
    InvalidEngineRequest,
    SamplingSpec,
    StructuredSpec,
    TokenLogprob,
)
from alignd.server.generation.events import ChoiceEvent, TraceSpan
from alignd.server.generation.plain import generate_plain
from alignd.server.generation.streams import merge_streams
from alignd.server.models import HostedModel
from alignd.server.router import PlainTarget, RecipeTarget, Router

__all__ = ["Endpoint", "Serving"]

Endpoint = Literal["completion", "chat"]


def _structured(req: SamplingFields) -> StructuredSpec | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredSpec("json_object", True)
    assert fmt.json_schema is not None
    return StructuredSpec("json", fmt.json_schema.schema_)


@dataclass
class _Prepared:
    target: PlainTarget | RecipeTarget
    prompts: list[list[int]]  # one per prompt (completions may batch prompts)
    prompt_texts: list[str]
    max_tokens: int
    logprobs: int | None
    messages: list[dict[str, str]] | None = None
    raw_prompts: list[str] = field(default_factory=list)


@dataclass
class _ChoiceState:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    spans: list[TraceSpan] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _api_error(exc: BaseException) -> APIError:
    """The API error a generation failure becomes (anything unexpected is a 500, logged)."""
    from alignd.decoders.contract import DecoderError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineUnavailable):
        return ServiceUnavailable(str(exc))
    if isinstance(exc, InvalidEngineRequest):
        return BadRequest(str(exc), exc.param)
    if isinstance(exc, DecoderError):
        return BadRequest(str(exc), exc.param)
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
        raise exc
    import logging

    logging.getLogger("alignd.server").error("generation failed", exc_info=exc)
    err = APIError(f"internal error: {type(exc).__name__}: {exc}")
    return err


class _IdTokens:
    """Token strings as vLLM's ``return_tokens_as_token_ids`` spells them."""

    @staticmethod
    def token_text(token_id: int) -> str:
        return f"token_id:{token_id}"


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


class Serving:
    """The shared serving logic behind ``/v1/completions`` and ``/v1/chat/completions``."""

    def __init__(self, router: Router, metrics: Any = None) -> None:
        self.router = router
        self.metrics = metrics

    # ---- preparation ---------------------------------------------------------------------------------

    def _check_length(self, model: HostedModel, n_prompt: int, max_tokens: int | None) -> int:
        limit = model.engine.info.max_model_len
        if n_prompt > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your prompt is "
                f"{n_prompt} tokens. Please reduce the length of the prompt.",
                "messages" if max_tokens is None else "prompt",
            )
        if max_tokens is None:
            return limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        return max_tokens

    def _prepare(self, req: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint) -> _Prepared:
        target = self.router.resolve(req.model, req.alignment)
        if isinstance(req, CompletionRequest):
            if req.suffix:
                raise BadRequest("suffix is not supported", "suffix")
            if req.best_of is not None and req.best_of != req.n:
                raise BadRequest("best_of must equal n when given", "best_of")
            raw = req.prompt
            if isinstance(raw, str):
                items: list[Any] = [raw]
            elif raw and all(isinstance(x, int) for x in raw):
                items = [raw]
            else:
                items = list(raw)  # type: ignore[arg-type]
            max_tokens = req.max_tokens if req.max_tokens is not None else 16
            logprobs = req.logprobs
            messages = None
        else:
            if req.tools:
                raise BadRequest("tools are not supported by alignd", "tools")
            items = []
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as exc:
                raise BadRequest(str(exc), "messages") from None
        if isinstance(target, PlainTarget):
            tok = target.model.tokenizer
            prompts, texts = [], []
            if messages is not None:
                try:
                    text, ids = tok.render_chat(
                        messages,
                        add_generation_prompt=req.add_generation_prompt,  # type: ignore[union-attr]
                        template_kwargs=req.chat_template_kwargs,  # type: ignore[union-attr]
                    )
                except (ValueError, TypeError, KeyError) as exc:
                    raise BadRequest(f"cannot apply the chat template: {exc}", "messages") from None
                except Exception as exc:  # noqa: BLE001 - jinja errors have their own tree
                    raise BadRequest(f"cannot apply the chat template: {exc}", "messages") from None
                prompts.append(ids)
                texts.append(text)
            else:
                vocab = target.model.engine.info.vocab_size
                for item in items:
                    if isinstance(item, str):
                        prompts.append(tok.render_prompt(item))
                        texts.append(item)
                    else:
                        if not item or any((not isinstance(t, int)) or t < 0 or t >= vocab for t in item):
                            raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
                        prompts.append(list(item))
                        texts.append(tok.decode(item, skip_special_tokens=False))
            model = target.model
            if req.logit_bias:
                vocab = model.engine.info.vocab_size
                for key in req.logit_bias:
                    if not 0 <= int(key) < vocab:
                        raise BadRequest(f"logit_bias token id {key} is outside the vocabulary", "logit_bias")
            limits = [self._check_length(model, len(p), max_tokens) for p in prompts]
            return _Prepared(target, prompts, texts, min(limits), logprobs, messages, [])
        # recipe
        from alignd.server.generation.composite import prepare_role_prompts

        raw_prompts = [x if isinstance(x, str) else None for x in items]
        if any(p is None for p in raw_prompts):
            raise BadRequest("recipes take text prompts, not token ids", "prompt")
        out_model = target.output_model
        prompts, texts = [], []
        for raw_prompt in raw_prompts or [None]:
            role_prompts = prepare_role_prompts(target, messages=messages, prompt=raw_prompt)
            for bound in target.roles.values():
                if bound.model.settings.task == "generate":
                    self._check_length(bound.model, len(role_prompts[bound.role][1]), max_tokens)
            out_text, out_ids = role_prompts[target.decoder.output_role()]
            prompts.append(out_ids)
            texts.append(out_text)
        limit = self._check_length(out_model, max(len(p) for p in prompts), max_tokens)
        return _Prepared(target, prompts, texts, limit, logprobs, messages, [p or "" for p in raw_prompts])

    def _spec(self, req: CompletionRequest | ChatCompletionRequest, prepared: _Prepared) -> SamplingSpec:
        temperature = 1.0 if req.temperature is None else req.temperature
        spec = SamplingSpec(
            max_tokens=prepared.max_tokens,
            n=req.n,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k if req.top_k and req.top_k > 0 else 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            logprobs=prepared.logprobs,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0,
            structured=_structured(req),
            stream=bool(req.stream),
        )
        if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
            spec.prompt_logprobs = req.logprobs
        return spec

    # ---- generation ----------------------------------------------------------------------------------

    async def _events(
        self, request_id: str, prepared: _Prepared, spec: SamplingSpec
    ) -> AsyncGenerator[tuple[int, ChoiceEvent, list[Any] | None], None]:
        """Events of every choice of every prompt, with the choice index made global."""
        n = spec.n
        streams: list[AsyncIterator[ChoiceEvent]] = []
        for i, prompt_ids in enumerate(prepared.prompts):
            if isinstance(prepared.target, PlainTarget):
                it = generate_plain(prepared.target.model, f"{request_id}-{i}", prompt_ids, spec)
            else:
                from alignd.server.generation.composite import generate_composite

                raw = prepared.raw_prompts[i] if prepared.raw_prompts else None
                it = generate_composite(
                    prepared.target, f"{request_id}-{i}", spec,
                    messages=prepared.messages, prompt=raw, metrics=self.metrics,
                )
            streams.append(it)
        async with aclosing(merge_streams(streams)) as merged:
            async for p_index, event in merged:
                event.index = p_index * n + event.index
                yield p_index, event, None

    # ---- responses ---------------------------------------------------------------------------------

    def _logprobs_json(
        self,
        endpoint: Endpoint,
        model: HostedModel,
        lps: list[TokenLogprob],
        text_offset0: int = 0,
        as_ids: bool = False,
    ) -> dict[str, Any]:
        tok: Any = _IdTokens() if as_ids else model.tokenizer
        if endpoint == "chat":
            content = []
            for lp in lps:
                text = tok.token_text(lp.token_id)
                content.append({
                    "token": text,
                    "logprob": max(lp.logprob, -9999.0),
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [
                        {"token": (t := tok.token_text(i)), "logprob": max(v, -9999.0), "bytes": list(t.encode())}
                        for i, v in lp.top
                    ],
                })
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = text_offset0
        for lp in lps:
            text = tok.token_text(lp.token_id)
            tokens.append(text)
            token_lps.append(None if lp.logprob is None or math.isinf(lp.logprob) else lp.logprob)
            tops.append(None if math.isinf(lp.logprob) else {tok.token_text(i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _trace_json(self, spans: list[TraceSpan], final: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"spans": [s.to_json() for s in spans]}
        if final:
            counts: dict[str, int] = {}
            for s in spans:
                counts[s.role] = counts.get(s.role, 0) + len(s.token_ids)
            total = sum(counts.values()) or 1
            body["role_token_share"] = {role: c / total for role, c in counts.items()}
            body["role_token_counts"] = counts
        return body

    def _output_model(self, prepared: _Prepared) -> HostedModel:
        t = prepared.target
        return t.model if isinstance(t, PlainTarget) else t.output_model

    async def complete(
        self, req: CompletionRequest | ChatCompletionRequest, endpoint: Endpoint
    ) -> dict[str, Any] | AsyncIterator[str]:
        """Serve one request: a response body, or an async iterator of SSE lines when streaming."""
        prepared = self._prepare(req, endpoint)
        spec = self._spec(req, prepared)
        request_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            # Fail before the 200 goes out if the engines are down or the first step is refused.
            self._check_ready(prepared)
            events = self._events(request_id, prepared, spec)
            try:
                first = await events.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException as exc:  # noqa: BLE001 - re-raised as an API error
                await events.aclose()
                raise _api_error(exc) from None
            return self._stream(req, endpoint, prepared, spec, request_id, events, first)
        return await self._whole(req, endpoint, prepared, spec, request_id)

    def _check_ready(self, prepared: _Prepared) -> None:
        t = prepared.target
        models = [t.model] if isinstance(t, PlainTarget) else [r.model for r in t.roles.values()]
        for m in models:
            if not m.engine.ready:
                raise ServiceUnavailable(f"model {m.name!r} is not ready")

    async def _whole(
        self, req: Any, endpoint: Endpoint, prepared: _Prepared, spec: SamplingSpec, request_id: str
    ) -> dict[str, Any]:
        n_total = spec.n * len(prepared.prompts)
        states = [_ChoiceState() for _ in range(n_total)]
        try:
            async for _, ev, _unused in self._events(request_id, prepared, spec):
                st = states[ev.index]
                st.text += ev.text
                st.token_ids += ev.token_ids
                st.logprobs += ev.logprobs or []
                st.spans += ev.spans
                if ev.prompt_logprobs is not None and st.prompt_logprobs is None:
                    st.prompt_logprobs = ev.prompt_logprobs
                if ev.finish_reason:
                    st.finish_reason, st.stop_reason = ev.finish_reason, ev.stop_reason
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error
            raise _api_error(exc) from None
        model = self._output_model(prepared)
        trace = isinstance(prepared.target, RecipeTarget) and prepared.target.trace
        choices = []
        echo = isinstance(req, CompletionRequest) and req.echo
        for i, st in enumerate(states):
            p_index = i // spec.n
            choice: dict[str, Any] = {"index": i, "finish_reason": st.finish_reason or "length"}
            if endpoint == "chat":
                choice["message"] = {"role": "assistant", "content": st.text}
                choice["logprobs"] = (
                    self._logprobs_json("chat", model, st.logprobs, 0, req.return_tokens_as_token_ids)
                    if prepared.logprobs is not None else None
                )
            else:
                text = st.text
                if echo:
                    text = prepared.prompt_texts[p_index] + text
                choice["text"] = text
                lps = st.logprobs
                if echo and st.prompt_logprobs is not None:
                    prompt_ids = prepared.prompts[p_index]
                    lps = [
                        lp if lp is not None else TokenLogprob(prompt_ids[k], float("-inf"))
                        for k, lp in enumerate(st.prompt_logprobs)
                    ] + lps
                choice["logprobs"] = (
                    self._logprobs_json("completion", model, lps,
                                        0,
                                        req.return_tokens_as_token_ids)
                    if prepared.logprobs is not None else None
                )
            if st.stop_reason is not None:
                choice["stop_reason"] = st.stop_reason
            if trace:
                choice["alignment_trace"] = self._trace_json(st.spans, final=True)
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prepared.prompts)
        completion_tokens = sum(len(st.token_ids) for st in states)
        if self.metrics is not None:
            self.metrics.observe_tokens(prepared, prompt_tokens, completion_tokens)
        return {
            "id": request_id,
            "object": "chat.completion" if endpoint == "chat" else "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": None,
        }

    async def _stream(
        self,
        req: Any,
        endpoint: Endpoint,
        prepared: _Prepared,
        spec: SamplingSpec,
        request_id: str,
        events: AsyncGenerator[tuple[int, ChoiceEvent, Any], None],
        first: tuple[int, ChoiceEvent, Any] | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        model = self._output_model(prepared)
        trace = isinstance(prepared.target, RecipeTarget) and prepared.target.trace
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n_total = spec.n * len(prepared.prompts)
        completion_tokens = 0
        started: set[int] = set()
        finished: set[int] = set()
        offsets = [0] * n_total

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {
                "id": request_id, "object": obj, "created": created, "model": req.model, "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if endpoint == "completion" and req.echo:
                for i in range(n_total):
                    text = prepared.prompt_texts[i // spec.n]
                    offsets[i] = len(text)
                    yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
            async for _, ev, _unused in _chain(first, events):
                completion_tokens += len(ev.token_ids)
                choice: dict[str, Any] = {"index": ev.index}
                if endpoint == "chat":
                    delta: dict[str, Any] = {}
                    if ev.index not in started:
                        delta["role"] = "assistant"
                        started.add(ev.index)
                    if ev.text or not delta:
                        delta["content"] = ev.text
                    choice["delta"] = delta
                    choice["logprobs"] = (
                        self._logprobs_json("chat", model, ev.logprobs or [], 0, req.return_tokens_as_token_ids)
                        if prepared.logprobs is not None else None
                    )
                else:
                    choice["text"] = ev.text
                    choice["logprobs"] = (
                        self._logprobs_json("completion", model, ev.logprobs or [], offsets[ev.index],
                                            req.return_tokens_as_token_ids)
                        if prepared.logprobs is not None else None
                    )
                    offsets[ev.index] += len(ev.text)
                choice["finish_reason"] = ev.finish_reason
                if ev.finish_reason:
                    finished.add(ev.index)
                if trace:
                    choice["alignment_trace"] = self._trace_json(ev.spans, final=False)
                yield chunk([choice])
            for i in range(n_total):
                if i not in finished:
                    empty: dict[str, Any] = {"index": i, "finish_reason": "length", "logprobs": None}
                    if endpoint == "chat":
                        empty["delta"] = {}
                    else:
                        empty["text"] = ""
                    yield chunk([empty])
            prompt_tokens = sum(len(p) for p in prepared.prompts)
            if self.metrics is not None:
                self.metrics.observe_tokens(prepared, prompt_tokens, completion_tokens)
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield chunk([], usage)
        except Exception as exc:  # noqa: BLE001
            # Headers are gone: report the error in the stream, as vLLM and OpenAI do.
            err = _api_error(exc)
            body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

"""Recipes: one decoder run per choice, its engine operations executed by :class:`DecoderExecutor`.

Per request: every role gets its own prompt (its model's chat template or prompt format, its own system
prompt variant), the request's sampling options, stop strings and grammar go into a
:class:`DecoderContext`, and the ``n`` choices run concurrently, each with its own random generator
(``seed + i`` when the request has a seed). Emits become :class:`ChoiceEvent` deltas with provenance spans.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np

from alignd.decoders.contract import DecoderContext, Emit, Finish, RoleContext, SamplingOptions
from alignd.server.engines.base import SamplingSpec, TokenLogprob
from alignd.server.generation.events import ChoiceEvent, TraceSpan
from alignd.server.generation.executor import DecoderExecutor
from alignd.server.generation.streams import merge_streams
from alignd.server.models import HostedModel
from alignd.server.router import BoundRole, RecipeTarget

__all__ = ["generate_composite", "grammar_store", "prepare_role_prompts"]

_store_lock = threading.Lock()
_grammar_store: Any = None


def grammar_store() -> Any:
    """The process-wide ASAp trie store (bounded in memory), shared across requests."""
    global _grammar_store
    with _store_lock:
        if _grammar_store is None:
            from alignd.decoders.grammar.asap import TrieStore

            _grammar_store = TrieStore()
        return _grammar_store


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None:
        return messages
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    return [{"role": "system", "content": system_prompt}, *rest]


def _role_prompt(
    bound: BoundRole, messages: list[dict[str, str]] | None, prompt: str | None
) -> tuple[str, list[int]]:
    tok = bound.model.tokenizer
    if messages is None:
        text = prompt or ""
        if bound.prompt_format:
            msgs = _with_system([{"role": "user", "content": text}], bound.system_prompt)
            return tok.render_chat(msgs, prompt_format=bound.prompt_format)
        if bound.system_prompt:
            text = f"{bound.system_prompt}\n\n{text}"
        return text, tok.render_prompt(text)
    return tok.render_chat(_with_system(messages, bound.system_prompt), prompt_format=bound.prompt_format)


def prepare_role_prompts(
    target: RecipeTarget, *, messages: list[dict[str, str]] | None, prompt: str | None
) -> dict[str, tuple[str, list[int]]]:
    """Each role's prompt text and token ids (reward roles get the text only, ids empty)."""
    out: dict[str, tuple[str, list[int]]] = {}
    for role, bound in target.roles.items():
        if bound.model.settings.task == "reward":
            text = prompt if messages is None else "\n".join(m["content"] for m in messages)
            out[role] = (text or "", [])
            continue
        try:
            out[role] = _role_prompt(bound, messages, prompt)
        except Exception as exc:  # noqa: BLE001 - template errors come in many types
            from alignd.server.api.errors import BadRequest

            raise BadRequest(f"cannot build the prompt of role {role!r}: {exc}", "messages") from None
    return out


def _grammar_vocab(model: HostedModel) -> Any:
    vocab = getattr(model, "_grammar_vocab", None)
    if vocab is None:
        from alignd.decoders.grammar.vocab import GrammarVocab

        info = model.engine.info
        eos = set(info.eos_token_ids) | set(model.tokenizer.eos_token_ids)
        vocab = GrammarVocab.for_tokenizer(model.tokenizer.hf, info.vocab_size, eos)
        model._grammar_vocab = vocab  # type: ignore[attr-defined]
    return vocab


def _grammar_spec(spec: SamplingSpec) -> Any:
    if spec.structured is None:
        return None
    from alignd.decoders.grammar.spec import GrammarSpec

    kind = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "grammar": "ebnf",
            "choice": "choice"}[spec.structured.kind]
    value = None if kind == "json_object" else spec.structured.value
    return GrammarSpec(kind=kind, value=value)


def _role_contexts(target: RecipeTarget, prompts: dict[str, tuple[str, list[int]]]) -> dict[str, RoleContext]:
    roles = {}
    for role, bound in target.roles.items():
        m = bound.model
        info = m.engine.info
        text, ids = prompts[role]
        roles[role] = RoleContext(
            name=role,
            model=m.name,
            prompt_ids=ids,
            tokenizer=m.tokenizer,
            vocab_size=info.vocab_size,
            eos_token_ids=frozenset(info.eos_token_ids | m.tokenizer.eos_token_ids),
            prompt_text=text,
        )
    return roles


def _reward_formatter(target: RecipeTarget) -> Any:
    def fmt(role: str, prompt: str, response: str) -> str:
        tok = target.roles[role].model.tokenizer
        if tok.has_chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return str(tok.hf.apply_chat_template(msgs, tokenize=False))
        return f"{prompt}{response}"

    return fmt


async def generate_composite(
    target: RecipeTarget,
    request_id: str,
    spec: SamplingSpec,
    *,
    messages: list[dict[str, str]] | None,
    prompt: str | None,
    metrics: Any = None,
) -> AsyncIterator[ChoiceEvent]:
    """Run ``spec.n`` choices of a recipe and stream their deltas."""
    prompts = prepare_role_prompts(target, messages=messages, prompt=prompt)
    sampling = SamplingOptions(
        temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, min_p=spec.min_p, seed=spec.seed
    )
    grammar_spec = _grammar_spec(spec)
    out_role = target.decoder.output_role()
    out_model = target.roles[out_role].model

    # prometheus children, looked up once per request
    op_counters: dict[tuple[str, str], Any] = {}
    step_counters: dict[str, Any] = {}

    def on_op(role: str, op: str, steps: int) -> None:
        if metrics is not None:
            model = target.roles[role].model.name
            counter = op_counters.get((role, op))
            if counter is None:
                counter = op_counters[(role, op)] = metrics.engine_ops.labels(model, op)
            counter.inc()
            step_counter = step_counters.get(role)
            if step_counter is None:
                step_counter = step_counters[role] = metrics.decode_steps.labels(model)
            step_counter.inc(steps)

    async def one_choice(index: int) -> AsyncIterator[ChoiceEvent]:
        seed = None if spec.seed is None else spec.seed + index
        roles = _role_contexts(target, prompts)
        extra: dict[str, Any] = {"grammar_store": grammar_store()}
        grammar = None
        if grammar_spec is not None or target.decoder.name == "grammar":
            extra["grammar_vocab"] = _grammar_vocab(out_model)
        if grammar_spec is not None:
            extra["grammar_spec"] = grammar_spec
            if target.decoder.name != "grammar":
                from alignd.decoders.grammar.factory import build_grammar

                grammar = build_grammar(grammar_spec, extra["grammar_vocab"])
        ctx = DecoderContext(
            roles=roles,
            max_tokens=spec.max_tokens,
            sampling=SamplingOptions(**{**sampling.__dict__, "seed": seed}),
            rng=np.random.default_rng(seed),
            stop_strings=tuple(spec.stop),
            top_logprobs=spec.logprobs or 0,
            trace=target.trace,
            grammar=grammar,
            extra=extra,
        )
        executor = DecoderExecutor(
            {r: b.model.engine for r, b in target.roles.items()},
            f"{request_id}-{index}",
            format_reward_pair=_reward_formatter(target),
            on_op=on_op,
        )
        async for item in executor.run(target.decoder.run(ctx)):
            if isinstance(item, Finish):
                yield ChoiceEvent(index=index, finish_reason=item.reason)
                continue
            assert isinstance(item, Emit)
            yield _event(index, item, target, out_model)
            if metrics is not None and item.token_ids:
                metrics.role_tokens.labels(target.name, item.role).inc(len(item.token_ids))

    async with aclosing(merge_streams([one_choice(i) for i in range(spec.n)])) as merged:
        async for _, event in merged:
            yield event


def _event(index: int, emit: Emit, target: RecipeTarget, out_model: HostedModel) -> ChoiceEvent:
    token_ids = list(emit.token_ids)
    text = emit.text if emit.text or not token_ids else out_model.tokenizer.decode(token_ids)
    logprobs = None
    if emit.logprobs and len(emit.logprobs) == len(token_ids):
        tops = list(emit.top_logprobs) if emit.top_logprobs else [{} for _ in token_ids]
        logprobs = [
            TokenLogprob(t, lp, sorted(top.items(), key=lambda kv: -kv[1]))
            for t, lp, top in zip(token_ids, emit.logprobs, tops)
        ]
    spans = [TraceSpan(text, token_ids, emit.role, emit.reason)] if target.trace else []
    return ChoiceEvent(index=index, text=text, token_ids=token_ids, logprobs=logprobs, spans=spans)

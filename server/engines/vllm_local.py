"""An in-process vLLM ``AsyncLLM`` behind alignd's :class:`Engine` interface.

The engine core runs in its own process (vLLM's design); this object lives in the gateway's event loop and
is shared by every request. Decoder sessions use vLLM 0.32's streaming-input requests: the request stays
open and keeps its KV cache while the gateway appends the tokens its decoder chose, one chunk per step
(``max_tokens=1`` per chunk: the engine's own sample is replaced by the next appended chunk).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignd.decoders.contract import GeneratedBlock, GenerateOp, ScoreOp, StepView, ViewSpec
from alignd.server.engines.base import (
    ChoiceDelta,
    Engine,
    EngineUnavailable,
    GenerationUpdate,
    InvalidEngineRequest,
    ModelInfo,
    SamplingSpec,
    Session,
    TokenLogprob,
    derive_view,
)
from alignd.server.engines.cpu_binding import BIND_ENV, omp_bind_value
from alignd.server.engines.vllm_plugin import OMP_BIND_KEY, REWIND_KEY, STEP_GROUP_KEY, can_rewind
from alignd.server.settings import ModelSettings

__all__ = ["LocalVLLMEngine", "on_cpu"]

log = logging.getLogger(__name__)

# Engine arguments alignd sets itself; the `vllm:` map of a model may override any of them.
_CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True}


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU backend here."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _sampling_params(spec: SamplingSpec) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if spec.structured is not None:
        kind, value = spec.structured.kind, spec.structured.value
        structured = StructuredOutputsParams(
            json=value if kind == "json" else None,
            json_object=True if kind == "json_object" else None,
            regex=value if kind == "regex" else None,
            grammar=value if kind == "grammar" else None,
            choice=value if kind == "choice" else None,
        )
    return SamplingParams(
        n=spec.n,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=max(0, spec.top_k),
        min_p=spec.min_p,
        seed=spec.seed,
        stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        ignore_eos=spec.ignore_eos,
        logprobs=spec.logprobs,
        prompt_logprobs=spec.prompt_logprobs,
        logit_bias=dict(spec.logit_bias) or None,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty,
        structured_outputs=structured,
        skip_special_tokens=spec.skip_special_tokens,
        # A whole (non-streamed) answer comes from the engine in one piece, as vLLM's own server asks for it:
        # no per-token outputs through the gateway's event loop.
        output_kind=RequestOutputKind.DELTA if spec.stream else RequestOutputKind.FINAL_ONLY,
    )


def _view_params(
    want: ViewSpec, max_tokens: int = 1, extra_args: dict[str, Any] | None = None, chosen_ids: bool = False,
    **extra: Any,
) -> Any:
    """Sampling parameters of a request whose views alignd reads as numpy rows; ``extra_args`` are added
    to alignd's own. With ``chosen_ids`` (the engine gives chosen-id log-probabilities to the requests that
    ask, see ``vllm_plugin``) a view of chosen ids alone asks for those ids instead of a whole row."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "detokenize": False,
        "flat_logprobs": True,
        "output_kind": RequestOutputKind.DELTA,
        # vLLM deep-copies the params of every streamed chunk unless told not to; alignd never mutates them
        "skip_clone": True,
        "extra_args": {_RAW_LOGPROBS: True, **(extra_args or {})},
    }
    if chosen_ids and want.token_ids and not want.full and not want.top_k:
        kwargs["logprobs"] = len(want.token_ids)
        kwargs["logprob_token_ids"] = list(want.token_ids)
    elif want.full or want.token_ids:
        # Elsewhere views of chosen ids come from the full row: in vLLM 0.32 one request with
        # logprob_token_ids in an engine step gives every other request of that step its gathered ids instead
        # of its own top-k or full row (Sampler.forward prefers them for the whole batch).
        kwargs["logprobs"] = -1
    else:
        kwargs["logprobs"] = max(1, want.top_k)
    kwargs.update(extra)
    return SamplingParams(**kwargs)


def _with_extra_args(params: Any, extra_args: dict[str, Any]) -> Any:
    """A shallow copy of ``params`` (vLLM's ``clone`` with ``skip_clone``, as alignd's parameters set it) with
    ``extra_args`` added; ``params`` itself is left as it is."""
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), **extra_args}
    return params


# ---- log-probabilities as numpy rows --------------------------------------------------------------
# vLLM's frontend turns every position's log-probabilities into Python lists (FlatLogprobs): for a
# full-vocabulary view that is ~50k floats boxed one by one per step, and a session keeps them all until
# it ends. Requests alignd marks with this flag keep each position as the numpy row the engine sent.
_RAW_LOGPROBS = "alignd_raw_logprobs"
_RAW_KEEP = 64  # rows a streamed (DELTA) request keeps: only the newest ones are ever read
# A session chunk's prompt log-probabilities come as rows over the whole context (see vllm_plugin): above
# this many values, scoring the chunk with a new request is cheaper.
_MAX_CHUNK_ROW_VALUES = 1 << 20


class _RawRow(tuple):  # type: ignore[type-arg]
    """One position: ``(token_ids, logprobs)`` arrays, the sampled token first, then the ranked ones."""


@dataclass(frozen=True)
class _ChunkRows:
    """Prompt log-probabilities of a session chunk: row ``i`` is the distribution after context token ``i``
    (the next token first, then the ranked ones); only the rows of the chunk's positions are set."""

    token_ids: np.ndarray
    logprobs: np.ndarray

    def row(self, position: int) -> _RawRow:
        return _RawRow((self.token_ids[position], self.logprobs[position]))


def _install_raw_logprobs() -> None:
    """Make vLLM's frontend keep flagged requests' sample log-probabilities as numpy rows (idempotent)."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import logprobs as vlp

    base = vlp.LogprobsProcessor
    if getattr(base, "_alignd_raw", False):
        return
    original = base.from_new_request.__func__  # type: ignore[attr-defined]

    class RawLogprobsProcessor(base):  # type: ignore[misc, valid-type]
        _delta = True

        def _update_sample_logprobs(self, logprobs_lists: Any) -> None:
            # Rows are kept whole: their width is the widest request's in the engine step, and a session's
            # chunks may each ask for a different view (vLLM's own processor cuts every row to the width
            # its first chunk asked for).
            token_ids, logprobs, _ranks, _cu = logprobs_lists
            rows = self.logprobs
            for ids, lps in zip(token_ids, logprobs):
                self.cumulative_logprob += float(lps[0])
                rows.append(_RawRow((ids, lps)))
            if self._delta and len(rows) > 2 * _RAW_KEEP:
                del rows[:-_RAW_KEEP]

        def _update_prompt_logprobs(self, tensors: Any) -> None:
            if self.num_prompt_logprobs is not None:  # the request asked when it was new: vLLM's own rows
                super()._update_prompt_logprobs(tensors)
                return
            # A session's later chunk (see vllm_plugin): rows over the whole context, set for the chunk only.
            token_ids, logprobs, *_ = tensors
            self._chunk_rows: _ChunkRows | None = _ChunkRows(token_ids.numpy(), logprobs.numpy())

        def pop_prompt_logprobs(self) -> Any:
            rows = getattr(self, "_chunk_rows", None)
            if rows is not None:
                self._chunk_rows = None
                return rows
            return super().pop_prompt_logprobs()

    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        proc = original(cls, tokenizer, request)
        sp = request.sampling_params
        if sp is not None and sp.extra_args and sp.extra_args.get(_RAW_LOGPROBS) and proc.logprobs is not None:
            proc.__class__ = RawLogprobsProcessor
            proc.logprobs = []
            proc._delta = sp.output_kind == RequestOutputKind.DELTA
        return proc

    base.from_new_request = classmethod(from_new_request)  # type: ignore[method-assign, assignment]
    base._alignd_raw = True  # type: ignore[attr-defined]


def _cache_eos_lookup(llm: Any) -> None:
    """vLLM asks the tokenizer for its EOS id on every request and every session chunk (through the
    tokenizer's attribute fallbacks: ~8% of the gateway's CPU per lockstep token, profiled with py-spy);
    the answer never changes, so ask once."""
    renderer = getattr(getattr(llm, "input_processor", None), "renderer", None)
    lookup = getattr(renderer, "get_eos_token_id", None)
    if renderer is None or lookup is None:
        return
    eos = lookup()
    renderer.get_eos_token_id = lambda: eos


def _row_view(row: _RawRow, want: ViewSpec, vocab_size: int) -> StepView:
    ids, lps = row
    if want.full or want.token_ids:
        # A whole row, or the sampled token and the chosen ids (see _view_params), padded by vLLM with id 0 at
        # -inf: a token at -inf reads the same whether it is in the view or not.
        keep = (ids >= 0) & (ids < vocab_size) & np.isfinite(lps)
        ids, lps = ids[keep], lps[keep]
        if not want.full and ids.size < vocab_size:
            return _position_view(ids, lps, want)
        dense = np.full(vocab_size, -np.inf)
        dense[ids] = lps
        full = StepView(logprobs=dense)
        if want.full:
            return full
        derived = derive_view(ViewSpec(full=True), full, want)
        assert derived is not None
        return derived
    k = max(1, want.top_k)
    return _position_view(ids[: k + 1], lps[: k + 1], want)  # the sampled token, then the ranked ones


def _position_view(ids: Sequence[int], lps: Sequence[float], want: ViewSpec) -> StepView:
    """One position of vLLM's flat logprobs as a view: deduplicated, most likely first."""
    id_arr = np.asarray(ids, dtype=np.int64)
    lp_arr = np.asarray(lps, dtype=np.float64)
    if want.full:
        dense = np.full(int(id_arr.max()) + 1 if id_arr.size else 0, -np.inf)
        dense[id_arr] = lp_arr
        return StepView(logprobs=dense)
    uniq, first = np.unique(id_arr, return_index=True)
    vals = lp_arr[first]
    order = np.argsort(-vals, kind="stable")
    if not want.token_ids and want.top_k:
        order = order[: want.top_k]
    return StepView(logprobs=vals[order], token_ids=uniq[order])


def _flat_views(flat: Any, want: ViewSpec, vocab_size: int, first: int = 0) -> list[StepView | None]:
    """Views of vLLM's logprobs positions (``None`` before position ``first``, which is not read: rows that
    came from the prefix cache hold no values)."""
    if isinstance(flat, list):  # numpy rows (see _install_raw_logprobs)
        return [_row_view(row, want, vocab_size) for row in flat]
    views: list[StepView | None] = []
    for i, (start, end) in enumerate(zip(flat.start_indices, flat.end_indices)):
        if i < first or start == end:
            views.append(None)
            continue
        view = _position_view(flat.token_ids[start:end], flat.logprobs[start:end], want)
        if view.token_ids is None and view.logprobs.shape[0] < vocab_size:
            view = StepView(logprobs=view.dense(vocab_size))
        views.append(view)
    return views


def _token_logprobs(token_ids: Sequence[int], logprobs: Any, k: int) -> list[TokenLogprob]:
    out = []
    for tid, position in zip(token_ids, logprobs):
        top = sorted(((i, lp.logprob) for i, lp in position.items()), key=lambda x: -x[1])[:k]
        chosen = position.get(tid)
        out.append(TokenLogprob(tid, chosen.logprob if chosen else float("-inf"), top))
    return out


def _translate(exc: BaseException) -> BaseException:
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(exc, EngineDeadError):
        return EngineUnavailable(f"engine died: {exc}")
    if isinstance(exc, EngineGenerateError):
        return EngineUnavailable(f"engine failed: {exc}")
    if isinstance(exc, ValueError):
        return InvalidEngineRequest(str(exc), getattr(exc, "parameter", None))
    return exc


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


class _LocalSession(Session):
    def __init__(self, engine: LocalVLLMEngine, request_id: str) -> None:
        self._engine = engine
        self._request_id = request_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._outputs: AsyncIterator[Any] | None = None
        self._context: list[int] = []
        self._last: tuple[ViewSpec, StepView] | None = None
        self._opened_with = 0
        self._group: tuple[str, int] | None = None
        self._keep: int | None = None  # the next chunk rewinds the engine's request to this many tokens first

    def join_step(self, group: str, size: int) -> None:
        self._group = (group, size)

    def _take_group(self) -> dict[str, Any] | None:
        """The ``extra_args`` that put this session's next chunk in its step group (see ``vllm_plugin``), if it
        joined one; the group is spent either way."""
        group, self._group = self._group, None
        return None if group is None else {STEP_GROUP_KEY: list(group)}

    async def _inputs(self) -> AsyncIterator[Any]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def view(self, context: Sequence[int], want: ViewSpec) -> StepView:
        group = self._take_group()
        context = list(context)
        await self._meet(context, len(context))
        if self._outputs is not None and context == self._context and self._last:
            # asked again at the position it holds: from the view it has, else its last token is sent again
            # with the view wanted (a rewind by one token), else a one-off request (it re-reads the context)
            derived = derive_view(self._last[0], self._last[1], want)
            if derived is not None:
                return derived
            if not self._rewind_to(len(context) - 1):
                block = await self._engine.generate_block(self._request_id, GenerateOp("", tuple(context), 1, want))
                return block.views[0]
        # in a group, the engine core waits for the group's other chunks before it steps (see vllm_plugin)
        params = self._engine.session_params(want, group)
        out = await self._append(context, params)
        view = _flat_views(out.outputs[0].logprobs, want, self._engine.info.vocab_size)[-1]
        assert view is not None
        self._context = context
        self._last = (want, view)
        return view

    async def generate(self, op: GenerateOp) -> GeneratedBlock | None:
        """``op`` written natively by this session (greedy only: vLLM 0.32 seeds a request's sampler when the
        request is new, so a seeded draw in a later chunk would not be reproducible); the session then holds
        the context and every written token but the last (vLLM drops a chunk's final sample)."""
        self._take_group()  # a block written natively steps alone
        context = list(op.context)
        await self._meet(context, len(context))
        if op.sampling.temperature > 0 or (self._outputs is not None and context == self._context):
            return None  # sampling, or nothing to append (a chunk carries at least one token)
        params = _view_params(
            op.want, max_tokens=op.max_tokens, stop_token_ids=list(op.stop_token_ids) or None
        )
        out = await self._append(context, params)
        tokens: list[int] = []
        views: list[StepView] = []
        while True:
            c = out.outputs[0]
            tokens.extend(c.token_ids)
            views.extend(v for v in _flat_views(c.logprobs, op.want, self._engine.info.vocab_size) if v is not None)
            if c.finish_reason is not None:
                break
            out = await self._next()
        if not tokens or len(views) != len(tokens):
            await self.close()  # nothing written (the context is full): what the engine holds is unknown
        else:
            self._context = context + tokens[:-1]
            self._last = (op.want, views[-1])
        return GeneratedBlock(token_ids=tokens, views=views, finished=c.finish_reason == "stop")

    async def score(self, op: ScoreOp) -> list[StepView] | None:
        """``op``'s views from this session: its new tokens appended as one chunk with prompt log-probabilities
        (see ``vllm_plugin``); ``None`` when the engine returns none for a session chunk, or when the rows it
        returns for the context (every position's, of which only the chunk's are set) would be too large."""
        engine = self._engine
        group = self._take_group()
        want, context, start = op.want, list(op.context), op.start
        wide = bool(want.full or want.token_ids)  # asked for as full rows (see _view_params)
        columns = engine.info.vocab_size if wide else max(1, want.top_k)
        if not engine.chunk_scoring or (columns + 1) * len(context) > _MAX_CHUNK_ROW_VALUES:
            return None
        await self._meet(context, start)  # not past the first position asked for
        if self._outputs is None:
            await self.view(context[:start], want)
        held = len(self._context)
        views: dict[int, StepView] = {}
        if held == start:
            views[start] = await self.view(context[:start], want)
        if held < len(context):
            prompt_logprobs = (-1 if wide else max(1, want.top_k)) if len(context) - held > 1 else None
            # the chunk steps with the group's other chunks (see vllm_plugin)
            out = await self._append(context, _view_params(want, prompt_logprobs=prompt_logprobs, extra_args=group))
            last = _flat_views(out.outputs[0].logprobs, want, engine.info.vocab_size)[-1]
            assert last is not None
            self._context, self._last = context, (want, last)
            views[len(context)] = last
            rows = out.prompt_logprobs
            if prompt_logprobs is not None and not isinstance(rows, _ChunkRows):
                log.warning("model %r returns no prompt log-probabilities for session chunks: scoring with new "
                            "requests", engine.name)
                engine.chunk_scoring = False
                return None
            for p in range(max(start, held + 1), len(context)):
                views[p] = _row_view(rows.row(p - 1), want, engine.info.vocab_size)
        return [views[p] for p in range(start, len(context) + 1)]

    async def _meet(self, context: list[int], most: int) -> None:
        """Make the open session hold a prefix of ``context`` of at most ``most`` tokens: as it is when it
        does, else rewound in place to fewer than ``most`` (see ``vllm_plugin``: the next chunk then carries
        at least one token), else closed (a new request reads the context again from the prefix cache)."""
        held = self._context
        n = len(held)
        if self._outputs is None or (n <= most and context[:n] == held):
            return
        if not self._rewind_to(min(_common_prefix(held, context), most - 1)):
            await self.close()

    def _rewind_to(self, keep: int) -> bool:
        """Make the next chunk rewind the open session to its first ``keep`` tokens, where the engine allows
        (see ``vllm_plugin``); whether it will."""
        block = self._engine.rewind_block
        if block is None or not can_rewind(keep, len(self._context), block):
            return False
        self._context, self._last, self._keep = self._context[:keep], None, keep
        self._opened_with = min(self._opened_with, keep)
        self._engine.rewinds += 1
        return True

    async def _append(self, context: list[int], params: Any) -> Any:
        """Send what ``context`` adds to the session (all of it when closed); returns the first output."""
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs.engine import tokens_input

        delta = context[len(self._context):] if self._outputs is not None else context
        if self._keep is not None:
            params = _with_extra_args(params, {REWIND_KEY: self._keep})
            self._keep = None
        # A rendered input: a raw TokensPrompt goes through the renderer again for every chunk (about 6% of the
        # gateway's CPU per session step). vLLM mutates the first chunk's prompt list in place (a known bug):
        # pass a copy.
        await self._queue.put(StreamingInput(prompt=tokens_input(list(delta)), sampling_params=params))
        if self._outputs is None:
            self._opened_with = len(context)
            self._outputs = self._engine.llm.generate(self._inputs(), params, self._request_id).__aiter__()
        return await self._next()

    async def _next(self) -> Any:
        assert self._outputs is not None
        try:
            return await self._outputs.__anext__()
        except Exception as exc:
            self._outputs = None
            raise _translate(exc) from exc

    @property
    def context(self) -> tuple[int, ...] | None:
        """The tokens the open session holds (``None`` when closed)."""
        return tuple(self._context) if self._outputs is not None else None

    @property
    def appended(self) -> int:
        """How many tokens were appended after the context the session opened with."""
        return len(self._context) - self._opened_with if self._outputs is not None else 0

    async def close(self) -> None:
        outputs, self._outputs = self._outputs, None
        self._context, self._last, self._keep = [], None, None
        if outputs is not None:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
            self._queue = asyncio.Queue()


async def _build_async_llm(args: Any) -> Any:
    """vLLM's ``AsyncLLM`` for ``args``, built in a thread.

    Its own coroutine, so that nothing but the engine refers to the built engine: a frame that outlives its
    call (an exception kept by some library refers to the frames it came through) would otherwise keep it
    until interpreter exit, where its ``__del__`` fails on the torn-down modules."""
    from vllm.v1.engine.async_llm import AsyncLLM

    building = asyncio.get_running_loop().run_in_executor(None, AsyncLLM.from_engine_args, args)
    try:
        return await asyncio.shield(building)
    except asyncio.CancelledError:
        # Shut down while loading: the engine core is a separate process, so an engine that finishes
        # building after the cancellation must still be stopped or it outlives the server.
        llm = await building
        await asyncio.to_thread(llm.shutdown)
        raise


class LocalVLLMEngine(Engine):
    """One hosted model in an in-process vLLM ``AsyncLLM``."""

    def __init__(
        self, name: str, settings: ModelSettings, kv_cache_gib: float | None = None, cores: list[int] | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.kv_cache_gib = kv_cache_gib
        self.cores = cores
        """CPU cores for this model's vLLM worker (``None``: vLLM's own choice)."""
        self.llm: Any = None
        self._ready = False
        self._counter = 0
        self._session_params: dict[ViewSpec, Any] = {}
        self.chunk_scoring = True
        """Whether sessions score appended chunks (alignd's vLLM plugin; off once the runner returns no rows)."""
        self.rewind_block: int | None = None
        """KV block size within which sessions rewind in place (alignd's vLLM plugin); ``None``: they restart."""
        self.chosen_ids = False
        """Whether views of chosen token ids ask for those ids (alignd's vLLM plugin) instead of whole rows."""

    def engine_args(self) -> Any:
        """vLLM's engine arguments for this model: alignd's defaults, then the config's `vllm:` map, and the
        model's CPU cores (:meth:`omp_bind`) for alignd's plugin in ``additional_config``."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        kwargs: dict[str, Any] = {
            "model": s.path,
            "dtype": s.dtype,
            "max_logprobs": s.max_logprobs,
            "disable_log_stats": True,
            "enable_prefix_caching": True,
            # Small models given JSON freedom often write whitespace until max_tokens runs out; compact JSON
            # is equally valid and ends where the model wants it to.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        }
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if s.task == "reward":
            kwargs["runner"] = "pooling"
            kwargs.pop("max_logprobs")
            kwargs.pop("enable_prefix_caching")
            kwargs.pop("structured_outputs_config")
        if on_cpu():
            kwargs.update(_CPU_DEFAULTS)
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                # The CPU backend reserves its KV cache up front: size it for a small machine.
                kwargs["kv_cache_memory_bytes"] = int((self.kv_cache_gib or 1.0) * 2**30)
        kwargs.update(s.vllm)
        args = AsyncEngineArgs(**kwargs)
        bind = self.omp_bind(args)
        if bind is not None:
            # taken up by the engine core process that vLLM starts (alignd's plugin), not through this
            # process's environment, which the models starting beside this one share
            args.additional_config = {**(args.additional_config or {}), OMP_BIND_KEY: bind}
        return args

    async def start(self) -> None:
        _install_raw_logprobs()
        args = self.engine_args()
        if OMP_BIND_KEY in args.additional_config:
            log.info("model %s: vLLM worker threads on cores %s", self.name, args.additional_config[OMP_BIND_KEY])
        self.llm = await _build_async_llm(args)
        _cache_eos_lookup(self.llm)
        self.rewind_block = await self._rewind_block_size()
        self.chosen_ids = await self._chosen_ids()
        cfg = self.llm.model_config
        eos: set[int] = set()
        gen_cfg = getattr(cfg, "hf_config", None)
        for source in (getattr(gen_cfg, "eos_token_id", None),):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(x) for x in source)
        self.info = ModelInfo(
            name=self.name,
            vocab_size=int(cfg.get_vocab_size()),
            max_model_len=int(cfg.max_model_len),
            eos_token_ids=frozenset(eos),
            task=self.settings.task,
        )
        self._ready = True

    async def _rewind_block_size(self) -> int | None:
        """The engine core's answer to whether its sessions can rewind in place (``None`` also when alignd's
        plugin does not run there)."""
        size = await self._ask_plugin("alignd_rewind_block_size", "sessions restart instead of rewinding")
        return int(size) if size else None

    async def _chosen_ids(self) -> bool:
        """The engine core's answer to whether its sampler gives chosen-id log-probabilities to the requests
        that ask alone (``False`` also when alignd's plugin does not run there)."""
        return bool(await self._ask_plugin("alignd_token_id_logprobs", "views of chosen ids read whole rows"))

    async def _ask_plugin(self, utility: str, without: str) -> Any:
        """The engine core's answer to one of alignd's plugin utility calls; ``None`` for a reward model or
        where the call fails (logged with ``without``: what alignd does instead)."""
        if self.settings.task == "reward":
            return None
        try:
            return await self.llm.engine_core.call_utility_async(utility)
        except Exception as exc:  # noqa: BLE001 (vLLM reports a failed utility call as a bare Exception)
            log.info("model %s: %s (%s)", self.name, without, exc)
            return None

    async def shutdown(self) -> None:
        self._ready = False
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    @property
    def starts_alone(self) -> bool:  # type: ignore[override]
        """On a GPU, yes: vLLM sizes an engine from the device memory free while it starts, which engines
        starting beside it on the same device would take. On a CPU each engine's memory is set up front."""
        return not on_cpu()

    @property
    def ready(self) -> bool:
        return self._ready and self.llm is not None and not self.llm.errored

    async def check_health(self) -> None:
        if not self.ready:
            raise EngineUnavailable(f"model {self.name!r} is not ready")
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise EngineUnavailable(f"model {self.name!r} is unhealthy: {exc}") from exc

    def omp_bind(self, args: Any) -> str | None:
        """The ``VLLM_CPU_OMP_THREADS_BIND`` this engine starts with: its cores (see ``cpu_binding``) on vLLM's
        CPU backend with one worker, unless the environment already says."""
        if not self.cores or BIND_ENV in os.environ or getattr(args, "tensor_parallel_size", 1) != 1:
            return None
        return omp_bind_value(self.cores) if on_cpu() else None

    def session_params(self, want: ViewSpec, extra_args: dict[str, Any] | None = None) -> Any:
        """The sampling parameters of one session step for ``want``, built once per engine (vLLM only
        shallow-copies them, and what it adds per model, the EOS ids, is the same for every request);
        ``extra_args`` go on a shallow copy (building them anew validates every field: about 20 us per chunk,
        6% of the gateway's CPU with 8 concurrent contrastive requests)."""
        params = self._session_params.get(want)
        if params is None:
            if len(self._session_params) >= 256:  # views of chosen ids vary per step: keep the cache small
                self._session_params.clear()
            params = self._session_params[want] = _view_params(want, chosen_ids=self.chosen_ids)
        return _with_extra_args(params, extra_args) if extra_args else params

    def _rid(self, request_id: str) -> str:
        self._counter += 1
        return f"{request_id}-{self.name}-{self._counter}"

    async def generate(
        self, request_id: str, prompt_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerationUpdate]:
        from vllm.inputs import TokensPrompt

        if not self.ready:
            raise EngineUnavailable(f"model {self.name!r} is not ready")
        try:
            params = _sampling_params(spec)
            stream = self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, self._rid(request_id))
            first = True
            async for out in stream:
                choices = []
                for c in out.outputs:
                    lps = None
                    if spec.logprobs is not None and c.logprobs is not None:
                        lps = _token_logprobs(c.token_ids, c.logprobs, spec.logprobs)
                    choices.append(
                        ChoiceDelta(c.index, list(c.token_ids), c.text, lps, c.finish_reason, c.stop_reason)
                    )
                prompt_lps = None
                if first and spec.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    prompt_lps = [None] + _token_logprobs(  # type: ignore[operator]
                        out.prompt_token_ids[1:], out.prompt_logprobs[1:], spec.prompt_logprobs
                    )
                yield GenerationUpdate(choices, list(out.prompt_token_ids or []), prompt_lps, out.finished)
                first = False
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    def open_session(self, request_id: str) -> Session:
        return _LocalSession(self, self._rid(request_id))

    async def generate_block(self, request_id: str, op: GenerateOp) -> GeneratedBlock:
        from vllm.inputs import TokensPrompt

        s = op.sampling
        params = _view_params(
            op.want,
            max_tokens=op.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            stop_token_ids=list(op.stop_token_ids) or None,
            output_kind=_final_kind(),
        )
        try:
            out = None
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=list(op.context)), params, self._rid(request_id)
            ):
                pass
        except Exception as exc:
            raise _translate(exc) from exc
        assert out is not None
        c = out.outputs[0]
        views = _flat_views(c.logprobs, op.want, self.info.vocab_size)
        return GeneratedBlock(
            token_ids=list(c.token_ids),
            views=[v for v in views if v is not None],
            finished=c.finish_reason == "stop",
        )

    async def score(self, request_id: str, op: ScoreOp) -> list[StepView]:
        from vllm.inputs import TokensPrompt

        if op.start < 1 or op.start > len(op.context):
            raise InvalidEngineRequest(f"score start {op.start} outside 1..{len(op.context)}")
        want = op.want
        k = -1 if want.full else max(1, want.top_k)
        extra: dict[str, Any] = {"prompt_logprobs": k, "output_kind": _final_kind()}
        if want.token_ids and not want.full:
            extra["prompt_logprobs"] = None
            extra["prompt_logprob_token_ids"] = [sorted(set(want.token_ids))] * (len(op.context) - 1)

        async def run(read_cache: bool) -> Any:
            params = _view_params(want, skip_reading_prefix_cache=not read_cache, **extra)
            out = None
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=list(op.context)), params, self._rid(request_id)
            ):
                pass
            assert out is not None
            return out

        try:
            # vLLM recomputes the whole prompt for prompt log-probabilities unless told it may read the prefix
            # cache; then it computes them only after the cached tokens and leaves the rows before unset. They
            # are read when the cache covered no position the views need, else the block is scored again.
            cached_ok = "prompt_logprob_token_ids" not in extra
            out = await run(read_cache=cached_ok)
            if cached_ok and (out.num_cached_tokens is None or out.num_cached_tokens > op.start - 1):
                out = await run(read_cache=False)
        except Exception as exc:
            raise _translate(exc) from exc
        prompt_views = _flat_views(out.prompt_logprobs, want, self.info.vocab_size, first=op.start)
        last = _flat_views(out.outputs[0].logprobs, want, self.info.vocab_size)[-1]
        views = [v for v in prompt_views[op.start:]] + [last]
        if any(v is None for v in views):
            raise InvalidEngineRequest("the engine returned no log-probabilities for part of the block")
        return views  # type: ignore[return-value]

    async def reward(self, request_id: str, texts: list[str]) -> list[float]:
        from vllm.pooling_params import PoolingParams

        async def one(i: int, text: str) -> float:
            params = PoolingParams(task="classify", use_activation=False)
            out = None
            async for out in self.llm.encode(text, params, self._rid(f"{request_id}-{i}")):
                pass
            assert out is not None
            data = out.outputs.data
            return float(np.asarray(data.float() if hasattr(data, "float") else data).reshape(-1)[0])

        try:
            return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))
        except Exception as exc:
            raise _translate(exc) from exc


def _final_kind() -> Any:
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY

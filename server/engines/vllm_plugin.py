"""alignd's vLLM plugin: session steps a decoder sends together run in one engine step, a session's
appended chunk can carry prompt log-probabilities, and a session can be rewound in place.

vLLM loads it in every process it starts (entry point group ``vllm.general_plugins``); it changes nothing
unless a request carries :data:`STEP_GROUP_KEY` or :data:`REWIND_KEY` in ``SamplingParams.extra_args``,
or a streaming-input session's later chunk asks for ``prompt_logprobs``.

Step groups
-----------

Why: a decoder often advances several sessions of one model at once (contrastive's expert and amateur as
one model under two system prompts, ARGS's scoring roles). The gateway sends their new chunks one after
another; on a busy machine the first send takes a fraction of a millisecond, and an idle engine core starts
a step with the first chunk before the others arrive, so every token took two or three engine steps.
Measured on the embedded SmolLM2 (two sessions stepped together, 48 steps): 54-64 ms per step against
35-43 ms for one session. Each chunk of such a group names the group and its size; after taking what is
queued, the engine core waits for the group's missing chunks for at most :data:`WAIT_SECONDS` before it
steps.

Sessions of different requests drift apart the same way: with 8 concurrent contrastive requests (16
sessions of SmolLM2), the gateway answers one engine step's outputs one after another, the engine core
starts the next step with the chunks that have arrived, and one request's pair settled one step behind the
others for good: of 99 steps, 45 held 12-14 sessions and 50 held 2. So when sessions of the last step (two
or more) have yet to send their next chunk and nothing else runs, the engine core waits for those chunks
for at most half the last step's duration (:data:`RETURN_WAIT_FRACTION`, never more than
:data:`RETURN_WAIT_MAX`).
Measured on the same load: 57 steps instead of 99 (12.9 sessions per step on average), 4.6 s instead of
5.6 s. A session that writes a block natively, or any native request, is running, and the engine core then
never waits.

Prompt log-probabilities of a session chunk
-------------------------------------------
vLLM 0.32's model runner registers a request for prompt log-probabilities only when the request is new, so a
streaming-input session's later chunk gets none even when it asks. Speculative verification needs exactly
that: a role appends a drafted block to its session and reads its distribution at every drafted position in
one step, instead of a new request that recomputes the context from the last full prefix-cache block (128
tokens on CPU). :func:`register` makes the runner register such a chunk as well; the runner then computes
log-probabilities for the chunk's positions only (the rows before it stay unset, and alignd never reads
them). A runner without this code path (vLLM's Model Runner V2) returns no rows, and alignd falls back to
scoring with a new request (see ``vllm_local``).

Log-probabilities of chosen token ids
-------------------------------------
A decoder often needs a role's log-probabilities of a few given tokens (ARGS's implicit reward at its
candidates, contrastive's amateur at head tokens outside its top-k). vLLM 0.32's sampler computes them
(``SamplingParams.logprob_token_ids``) but, when any request of the engine step also asks for top-k
log-probabilities, gives *every* request of the step the gathered ids instead of its own top-k. Without
:func:`register_token_id_logprobs` alignd therefore asks for whole vocabulary rows, which the sampler
sorts in full for every request of the step: 11 ms per step for three SmolLM2 rows (49k vocabulary),
67 ms for three of Gemma-3's 262k, against 0.3 and 1.3 ms for their top 10 (one core). The patch keeps
the top-k for the requests that asked for it and gives the gathered ids to the requests that asked for
those; the engine core's utility call ``alignd_token_id_logprobs`` tells the gateway it can ask.

CPU attention without AMX
-------------------------
vLLM 0.32's CPU backend runs bf16 attention on its AMX kernel wherever the CPU has AMX tiles, and that
kernel gives wrong answers: on a Xeon with AMX, vLLM alone (no alignd) decodes SmolLM2-135M-Instruct in
bf16, greedy, and answers "What is the capital of France?" with "L'Étoile, la Marseillaise, la femme, …";
with vLLM's vector attention kernel, in float32, or in transformers bf16 it answers "The capital of France is
Paris." :func:`register_cpu_attention_without_amx` makes the backend choose its vector kernel where it would
choose AMX (set ``ALIGND_CPU_ATTENTION_AMX=1`` to keep AMX). Other CPUs and GPUs are left alone.

A model's CPU cores
-------------------
vLLM's CPU backend binds a worker's OpenMP threads to the cores named by ``VLLM_CPU_OMP_THREADS_BIND``,
which the engine core reads from its environment when it starts its worker. alignd gives each model cores of
its own (``cpu_binding``) and starts the models at the same time, so the gateway cannot hand each engine core
its cores through its own (shared) environment. :func:`register_omp_threads_bind` makes the engine core take
them from ``additional_config`` (:data:`OMP_BIND_KEY`) instead.

Quiet downcasts
---------------
vLLM 0.32 warns once per weight when it loads a float32 checkpoint into a 16-bit model, after saying once
that it downcasts the model ("Downcasting torch.float32 to torch.bfloat16"): 268 lines at every start of
the embedded default, whose float32 checkpoints are served in bf16. :func:`register_quiet_downcasts` drops
those lines; any other dtype mismatch still warns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
from collections.abc import Callable
from typing import Any

from alignd.server.engines.cpu_binding import BIND_ENV

__all__ = [
    "CPU_ATTENTION_AMX_ENV",
    "OMP_BIND_KEY",
    "RETURN_WAIT_FRACTION",
    "RETURN_WAIT_MAX",
    "REWIND_KEY",
    "STEP_GROUP_KEY",
    "WAIT_SECONDS",
    "await_groups",
    "await_inputs",
    "can_rewind",
    "merge_token_id_logprobs",
    "register",
    "register_chunk_prompt_logprobs",
    "register_cpu_attention_without_amx",
    "register_omp_threads_bind",
    "register_quiet_downcasts",
    "register_session_rewind",
    "register_token_id_logprobs",
    "returning_sessions",
    "rewind_block_size",
    "rewind_request",
]

STEP_GROUP_KEY = "alignd_step_group"  # extra_args value: [group id, number of chunks in the group]
OMP_BIND_KEY = "alignd_omp_threads_bind"  # additional_config value: the worker's cores ("0,1")
REWIND_KEY = "alignd_keep"  # extra_args value: how many of the session's tokens to keep before this chunk
WAIT_SECONDS = 0.003  # longest wait for a group's missing chunks (a lost chunk costs this once)
# Longest wait for the sessions of the last engine step to send their next chunks: this fraction of that
# step's duration, and never more than RETURN_WAIT_MAX seconds.
RETURN_WAIT_FRACTION = 0.5
RETURN_WAIT_MAX = 0.025


def await_groups(
    groups: dict[str, list[int]], inputs: queue.Queue[Any], handle: Callable[[Any], None],
    timeout: float = WAIT_SECONDS,
) -> None:
    """Take inputs from ``inputs`` (handing each to ``handle``, which counts group members in ``groups``:
    id -> [seen, size]) until every group is complete or ``timeout`` seconds passed; then forget the
    groups."""
    await_inputs(lambda: any(seen < size for seen, size in groups.values()), inputs, handle, timeout)
    groups.clear()


def register() -> None:
    """Patch vLLM's engine core and model runner (idempotent); a vLLM without the expected internals is left
    alone."""
    register_chunk_prompt_logprobs()
    register_step_groups()
    register_session_rewind()
    register_token_id_logprobs()
    register_cpu_attention_without_amx()
    register_omp_threads_bind()
    register_quiet_downcasts()


class _DowncastFilter(logging.Filter):
    """Drops vLLM's warning that a float32 weight loads into a bfloat16 or float16 parameter."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(record.msg, str) and record.msg.startswith("Attempted to load weight %s with dtype %s into")
            and isinstance(args, tuple) and len(args) == 3
            and str(args[1]) == "torch.float32" and str(args[2]) in ("torch.bfloat16", "torch.float16")
        )


def register_quiet_downcasts() -> None:
    """Drop vLLM's per-weight warning for a float32 checkpoint loaded into a 16-bit model (see the module
    docstring); idempotent."""
    logger = logging.getLogger("vllm.model_executor.models.utils")
    if not any(isinstance(f, _DowncastFilter) for f in logger.filters):
        logger.addFilter(_DowncastFilter())


def register_omp_threads_bind() -> None:
    """Make vLLM's CPU backend bind a worker's OpenMP threads to the cores in the engine's
    ``additional_config`` (:data:`OMP_BIND_KEY`), set in the engine core's own environment before the worker
    starts (see the module docstring). An engine without that key, or a vLLM without this code, is left
    alone."""
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:
        return
    init = OMPProcessManager.__init__
    if getattr(init, "_alignd_bind", False):
        return

    def init_with_alignd_cores(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        cores = (getattr(config, "additional_config", None) or {}).get(OMP_BIND_KEY)
        if cores:
            os.environ[BIND_ENV] = str(cores)  # this engine core's process only
        init(self, config, *args, **kwargs)

    init_with_alignd_cores._alignd_bind = True  # type: ignore[attr-defined]
    OMPProcessManager.__init__ = init_with_alignd_cores  # type: ignore[method-assign]


CPU_ATTENTION_AMX_ENV = "ALIGND_CPU_ATTENTION_AMX"
"""Set to ``1`` to let vLLM's CPU backend keep its AMX attention kernel (see the module docstring)."""


def register_cpu_attention_without_amx() -> None:
    """Make vLLM's CPU attention use its vector kernel where it would choose its AMX kernel (see the module
    docstring); on other platforms, or with :data:`CPU_ATTENTION_AMX_ENV` set to ``1``, nothing changes."""
    if os.environ.get(CPU_ATTENTION_AMX_ENV) == "1":
        return
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends import cpu_attn
    except ImportError:
        return
    choose = getattr(cpu_attn, "_get_attn_isa", None)
    if choose is None or getattr(choose, "_alignd_no_amx", False):
        return

    def attention_isa_without_amx(*args: Any, **kwargs: Any) -> str:
        isa = choose(*args, **kwargs)
        # "vec" takes the same block sizes (multiples of 32) that "amx" does
        return "vec" if isa == "amx" else isa

    attention_isa_without_amx._alignd_no_amx = True  # type: ignore[attr-defined]
    cpu_attn._get_attn_isa = attention_isa_without_amx


def register_chunk_prompt_logprobs() -> None:
    """Make vLLM's (V1) model runner compute prompt log-probabilities for a session chunk that asks."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return
    update = getattr(GPUModelRunner, "_update_streaming_request", None)
    if update is None or getattr(GPUModelRunner, "_alignd_chunk_prompt_logprobs", False):
        return

    def update_streaming_request(self: Any, req_id: str, new_req_data: Any) -> Any:
        state = update(self, req_id, new_req_data)
        params = state.sampling_params
        if params is not None and params.prompt_logprobs is not None:
            vocab = self.input_batch.vocab_size
            self.num_prompt_logprobs[req_id] = vocab if params.prompt_logprobs == -1 else params.prompt_logprobs
            state.in_progress_prompt_logprobs_cpu = None
        return state

    GPUModelRunner._update_streaming_request = update_streaming_request  # type: ignore[method-assign]
    GPUModelRunner._alignd_chunk_prompt_logprobs = True  # type: ignore[attr-defined]


def register_step_groups() -> None:
    """Make vLLM's engine core wait (briefly) for a step group's missing chunks."""
    try:
        from vllm.v1.engine.core import EngineCore, EngineCoreProc
    except ImportError:
        return
    if getattr(EngineCore, "_alignd_step_groups", False):
        return
    add_request = EngineCore.add_request
    process_input_queue = getattr(EngineCoreProc, "_process_input_queue", None)
    process_engine_step = getattr(EngineCoreProc, "_process_engine_step", None)
    handle = getattr(EngineCoreProc, "_handle_client_request", None)
    if process_input_queue is None or process_engine_step is None or handle is None:
        return

    def add_request_grouped(self: Any, request: Any, request_wave: int = 0) -> None:
        add_request(self, request, request_wave)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        group = extra.get(STEP_GROUP_KEY)
        if group:
            groups: dict[str, list[int]] = self.__dict__.setdefault("_alignd_groups", {})
            seen = groups.setdefault(str(group[0]), [0, int(group[1])])
            seen[0] += 1

    def process_input_queue_grouped(self: Any) -> None:
        process_input_queue(self)
        groups: dict[str, list[int]] | None = self.__dict__.get("_alignd_groups")

        def take(item: Any) -> None:
            self._handle_client_request(*item)

        if groups:
            await_groups(groups, self.input_queue, take)
        last, self._alignd_last_sessions = self.__dict__.get("_alignd_last_sessions") or (), ()
        step_s = self.__dict__.get("_alignd_step_seconds", 0.0)
        if len(last) > 1 and step_s > 0:  # one session alone (a draft writing its block) has nobody to meet
            missing = returning_sessions(self.scheduler, last)
            if missing is not None:
                await_inputs(missing, self.input_queue, take, min(RETURN_WAIT_MAX, RETURN_WAIT_FRACTION * step_s))

    def process_engine_step_timed(self: Any) -> Any:
        t0 = time.monotonic()
        out = process_engine_step(self)
        self._alignd_step_seconds = time.monotonic() - t0
        sched = self.scheduler
        self._alignd_last_sessions = tuple(getattr(sched, "_alignd_scheduled", ()))
        return out

    EngineCore.add_request = add_request_grouped  # type: ignore[method-assign]
    EngineCoreProc._process_input_queue = process_input_queue_grouped  # type: ignore[method-assign]
    EngineCoreProc._process_engine_step = process_engine_step_timed  # type: ignore[method-assign]
    _record_scheduled_requests()
    EngineCore._alignd_step_groups = True  # type: ignore[attr-defined]


def _record_scheduled_requests() -> None:
    """Make vLLM's scheduler remember which requests its last step scheduled."""
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return

    schedule = Scheduler.schedule

    def schedule_recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = schedule(self, *args, **kwargs)
        self._alignd_scheduled = tuple(out.num_scheduled_tokens)
        return out

    Scheduler.schedule = schedule_recorded  # type: ignore[method-assign]


def returning_sessions(scheduler: Any, last: tuple[str, ...]) -> Callable[[], bool] | None:
    """A test of whether sessions of the last engine step are still to send their next chunk, or ``None``
    when the engine should not wait for them: something else is running (a native request, a session
    writing a block), or none of them is waiting for input."""
    from vllm.v1.request import RequestStatus

    if scheduler.running:
        return None
    requests = scheduler.requests
    ids = [
        rid for rid in last
        if (r := requests.get(rid)) is not None and r.resumable
        and r.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    ]
    if not ids:
        return None
    return lambda: any(
        (r := requests.get(rid)) is not None and r.status == RequestStatus.WAITING_FOR_STREAMING_REQ for rid in ids
    )


def await_inputs(
    pending: Callable[[], bool], inputs: queue.Queue[Any], handle: Callable[[Any], None], timeout: float
) -> None:
    """Take inputs from ``inputs`` (handing each to ``handle``) while ``pending()`` holds, for at most
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pending():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            item = inputs.get(timeout=remaining)
        except queue.Empty:
            return
        handle(item)


def rewind_block_size(kv_cache_config: Any) -> int | None:
    """The KV block size of a model whose sessions can be rewound in place (every layer keeps plain
    full-attention KV in blocks of one size), else ``None``."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    sizes = set()
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        if type(spec) not in (FullAttentionSpec, MLAAttentionSpec):
            return None
        sizes.add(int(spec.block_size))
    return sizes.pop() if len(sizes) == 1 else None


def can_rewind(keep: int, held: int, block_size: int) -> bool:
    """Whether a session holding ``held`` computed tokens can go back to its first ``keep`` in place: the
    tokens dropped all lie in the block it was filling, which only this session's KV occupies."""
    return 0 < keep <= held and keep // block_size == held // block_size


def rewind_request(request: Any, keep: int) -> None:
    """Drop all but the first ``keep`` tokens of a scheduler request waiting between chunks (vLLM's
    ``Request``), as if it had never computed the rest."""
    prompt = request.num_prompt_tokens
    if keep < prompt:
        del request.prompt_token_ids[keep:]
        request.num_prompt_tokens = keep
        request._output_token_ids.clear()
    else:
        del request._output_token_ids[keep - prompt:]
    del request._all_token_ids[keep:]
    request.num_computed_tokens = keep


def register_session_rewind() -> None:
    """Make vLLM's scheduler honour :data:`REWIND_KEY` on a session's chunk, and give the engine core the
    utility call ``alignd_rewind_block_size`` (see the module docstring)."""
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        return
    update = getattr(Scheduler, "_update_request_as_session", None)
    if update is None or getattr(Scheduler, "_alignd_rewind", False):
        return

    def block_size(scheduler: Any) -> int | None:
        if "_alignd_rewind_block" not in scheduler.__dict__:
            scheduler._alignd_rewind_block = rewind_block_size(scheduler.kv_cache_config)
        return scheduler._alignd_rewind_block  # type: ignore[no-any-return]

    def update_request_as_session(self: Any, session: Any, chunk: Any) -> None:
        params = chunk.sampling_params
        keep = (params.extra_args or {}).get(REWIND_KEY) if params is not None else None
        if keep is not None:
            size = block_size(self)
            held = session.num_computed_tokens
            if size is None or not can_rewind(int(keep), held, size):
                # the gateway asks only where rewind_block_size allows and can_rewind holds
                raise RuntimeError(f"alignd: cannot rewind session {session.request_id} from {held} to {keep} tokens")
            rewind_request(session, int(keep))
        update(self, session, chunk)

    def alignd_rewind_block_size(self: Any) -> int | None:
        return block_size(self.scheduler)

    Scheduler._update_request_as_session = update_request_as_session  # type: ignore[method-assign, assignment]
    Scheduler._alignd_rewind = True  # type: ignore[attr-defined]
    EngineCore.alignd_rewind_block_size = alignd_rewind_block_size  # type: ignore[attr-defined]


def merge_token_id_logprobs(top: Any, raw: Any, rows: list[int], token_ids: list[list[int]]) -> Any:
    """The sampler's top-k log-probabilities (``top``, vLLM's ``LogprobsTensors``: the sampled token first) with
    the given ``rows`` holding the log-probabilities of their ``token_ids`` after the sampled token instead;
    ``raw`` holds the raw log-probabilities of those rows (one per row, in order). Rows are padded with token 0
    at ``-inf`` (vLLM's own padding) to the widest."""
    import torch

    ids, lps = top.logprob_token_ids, top.logprobs
    batch, have = ids.shape
    width = max(have, 1 + max(len(t) for t in token_ids))
    out_ids = torch.zeros((batch, width), dtype=ids.dtype, device=ids.device)
    out_lps = torch.full((batch, width), float("-inf"), dtype=lps.dtype, device=lps.device)
    out_ids[:, :have] = ids
    out_lps[:, :have] = lps
    for j, (row, wanted) in enumerate(zip(rows, token_ids, strict=True)):
        chosen = torch.as_tensor(wanted, dtype=torch.int64, device=raw.device)
        out_ids[row, 1:] = 0
        out_lps[row, 1:] = float("-inf")
        out_ids[row, 1 : 1 + len(wanted)] = chosen.to(ids.dtype)
        out_lps[row, 1 : 1 + len(wanted)] = raw[j, chosen].to(lps.dtype)
    return top._replace(logprob_token_ids=out_ids, logprobs=out_lps)


def register_token_id_logprobs() -> None:
    """Make vLLM's (V1) sampler give log-probabilities of chosen token ids only to the requests that asked for
    them, and give the engine core the utility call ``alignd_token_id_logprobs`` (see the module docstring)."""
    try:
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.sample.sampler import Sampler
    except ImportError:
        return
    if getattr(Sampler, "_alignd_token_ids", False):
        return
    forward = Sampler.forward

    def forward_per_request(
        self: Any, logits: Any, sampling_metadata: Any, predict_bonus_token: bool = False,
        logprobs_mode_override: Any = None,
    ) -> Any:
        wanted = sampling_metadata.logprob_token_ids
        mode = logprobs_mode_override or self.logprobs_mode
        top_k = sampling_metadata.max_num_logprobs
        if not wanted or top_k is None or top_k < 0 or predict_bonus_token or mode != "raw_logprobs":
            return forward(self, logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
        rows = sorted(wanted)
        raw = self.compute_logprobs(logits[rows])  # before sampling, which may change the logits in place
        metadata = dataclasses.replace(sampling_metadata, logprob_token_ids=None)
        out = forward(self, logits, metadata, predict_bonus_token, logprobs_mode_override)
        out.logprobs_tensors = merge_token_id_logprobs(out.logprobs_tensors, raw, rows, [list(wanted[r]) for r in rows])
        return out

    def alignd_token_id_logprobs(self: Any) -> bool:
        config = self.vllm_config
        return not getattr(config, "use_v2_model_runner", False) and config.model_config.logprobs_mode == "raw_logprobs"

    Sampler.forward = forward_per_request  # type: ignore[method-assign]
    Sampler._alignd_token_ids = True  # type: ignore[attr-defined]
    EngineCore.alignd_token_id_logprobs = alignd_token_id_logprobs  # type: ignore[attr-defined]

"""Sessions go back in place (alignd's vLLM plugin) only where that is safe: the scheduler's request ends up
as a request that never held the dropped tokens, the gateway rewinds where the engine core allows and
closes the session otherwise. The served tests check the views against the references."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.request import Request, RequestStatus, StreamingUpdate

from alignd.server.engines.vllm_local import _LocalSession
from alignd.server.engines.vllm_plugin import (
    REWIND_KEY,
    can_rewind,
    register_session_rewind,
    rewind_block_size,
    rewind_request,
)


def _full(block: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=64, dtype=torch.float32)


def _config(*specs: Any) -> Any:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec) for spec in specs])


def test_only_plain_full_attention_in_one_block_size_rewinds() -> None:
    assert rewind_block_size(_config(_full(16))) == 16
    assert rewind_block_size(_config(_full(16), _full(16))) == 16
    assert rewind_block_size(_config(_full(16), _full(32))) is None
    window = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32, sliding_window=8)
    assert rewind_block_size(_config(_full(16), window)) is None


@pytest.mark.parametrize(
    ("keep", "held", "ok"),
    [(10, 12, True), (1, 15, True), (16, 20, True), (12, 12, True), (15, 16, False), (15, 17, False),
     (0, 5, False), (13, 12, False)],
)
def test_a_rewind_stays_in_the_block_being_filled(keep: int, held: int, ok: bool) -> None:
    assert can_rewind(keep, held, 16) is ok


def _session(prompt: list[int], outputs: list[int]) -> Request:
    """A streaming-input request that computed ``prompt`` and ``outputs`` but the last output."""
    request = Request("r", list(prompt), SamplingParams(max_tokens=len(outputs)), None, resumable=True)
    for token in outputs:
        request.append_output_token_ids(token)
    request.num_computed_tokens = len(prompt) + len(outputs) - 1
    request.status = RequestStatus.WAITING_FOR_STREAMING_REQ
    return request


@pytest.mark.parametrize("keep", [3, 5, 6, 7])
def test_a_rewound_request_holds_only_what_it_keeps(keep: int) -> None:
    request = _session([1, 2, 3, 4, 5], [6, 7, 8])
    rewind_request(request, keep)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8][:keep]
    assert list(request.all_token_ids) == tokens
    assert request.prompt_token_ids + list(request.output_token_ids) == tokens
    assert request.num_prompt_tokens == len(request.prompt_token_ids)
    assert request.num_computed_tokens == keep


def _scheduler(block: int) -> Any:
    from vllm.v1.core.sched.scheduler import Scheduler

    register_session_rewind()
    scheduler = SimpleNamespace(
        kv_cache_config=_config(_full(block)), hash_block_size=block, num_waiting_for_streaming_input=1,
        log_stats=False,
    )
    return scheduler, Scheduler._update_request_as_session


def _chunk(tokens: list[int], keep: int | None) -> StreamingUpdate:
    extra = {REWIND_KEY: keep} if keep is not None else None
    params = SamplingParams(max_tokens=1, extra_args=extra)
    return StreamingUpdate(mm_features=None, prompt_token_ids=tokens, max_tokens=1, arrival_time=0.0,
                           sampling_params=params)


def test_the_scheduler_appends_a_chunk_after_the_tokens_it_keeps() -> None:
    scheduler, update = _scheduler(16)
    request = _session([1, 2, 3, 4, 5], [6, 7, 8])
    update(scheduler, request, _chunk([9, 10], keep=6))
    assert request.prompt_token_ids == [1, 2, 3, 4, 5, 6, 9, 10] == list(request.all_token_ids)
    assert request.num_computed_tokens == 6 and request.num_prompt_tokens == 8
    assert request.status == RequestStatus.WAITING

    plain = _session([1, 2, 3, 4, 5], [6, 7, 8])
    update(scheduler, plain, _chunk([9], keep=None))  # without the key, vLLM's own behaviour
    assert plain.prompt_token_ids == [1, 2, 3, 4, 5, 6, 7, 9] and plain.num_computed_tokens == 7


def test_the_scheduler_refuses_a_rewind_into_a_full_block() -> None:
    scheduler, update = _scheduler(4)
    request = _session([1, 2, 3, 4, 5], [6, 7, 8])  # 7 computed: block 0 (4 tokens) is full
    with pytest.raises(RuntimeError, match="cannot rewind"):
        update(scheduler, request, _chunk([9], keep=3))


class _Outputs:
    async def aclose(self) -> None:
        pass


def _open_session(held: list[int], rewind_block: int | None) -> _LocalSession:
    engine: Any = SimpleNamespace(rewind_block=rewind_block, rewinds=0)
    session = _LocalSession(engine, "r")
    session._outputs = _Outputs()  # type: ignore[assignment]
    session._context = list(held)
    session._opened_with = 4
    return session


async def test_a_diverged_session_rewinds_where_the_engine_allows_and_closes_otherwise() -> None:
    held = [1, 2, 3, 4, 5, 6, 7, 8]
    session = _open_session(held, rewind_block=16)
    await session._meet([1, 2, 3, 4, 5, 9, 10], 7)
    assert session.context == (1, 2, 3, 4, 5) and session._keep == 5 and session._engine.rewinds == 1

    session = _open_session(held, rewind_block=16)
    await session._meet([1, 2, 3, 4, 5, 6], 6)  # a prefix of what it holds: one token is sent again
    assert session.context == (1, 2, 3, 4, 5) and session._keep == 5

    session = _open_session(held, rewind_block=16)
    await session._meet(held + [9], 9)  # it holds a prefix already: nothing to do
    assert session.context == tuple(held) and session._keep is None

    session = _open_session(held, rewind_block=16)
    await session._meet(held + [9], 3)  # scoring from position 3: fewer than 3 tokens kept
    assert session.context == (1, 2) and session._keep == 2 and session.appended == 0

    for block in (None, 4):  # no rewinds on this engine; the tokens dropped would reach into a full block
        session = _open_session(held, rewind_block=block)
        await session._meet([1, 2, 3, 9], 4)
        assert session.context is None and session._engine.rewinds == 0



@pytest.mark.parametrize(("block", "rewound"), [(16, True), (8, False)])  # 8 tokens held fill a block of 8
async def test_a_view_the_session_cannot_derive_sends_its_last_token_again(block: int, rewound: bool) -> None:
    """Asked again where it stands for what its last view lacks, a session rewinds by one token and sends that
    token again with the view wanted (one decode step), instead of a one-off request that re-reads the whole
    context; where it cannot rewind, the one-off request it is."""
    import numpy as np

    from alignd.decoders.contract import GeneratedBlock, StepView, ViewSpec
    from alignd.server.engines.vllm_local import _RawRow

    held = [1, 2, 3, 4, 5, 6, 7, 8]
    row = _RawRow((np.array([5, 5, 3, 7]), np.array([-0.1, -0.1, -2.0, -3.0])))
    sent: list[tuple[list[int], int | None]] = []
    one_offs: list[tuple[int, ...]] = []
    session = _open_session(held, rewind_block=block)
    engine = session._engine
    engine.info = SimpleNamespace(vocab_size=16)
    engine.session_params = lambda want, extra_args=None: want

    async def generate_block(request_id: str, op: Any) -> GeneratedBlock:
        one_offs.append(tuple(op.context))
        return GeneratedBlock(token_ids=[5], views=[StepView(logprobs=np.zeros(16))], finished=False)

    async def append(context: list[int], params: Any) -> Any:
        sent.append((context[len(session._context):], session._keep))
        session._keep = None
        return SimpleNamespace(outputs=[SimpleNamespace(logprobs=[row])])

    engine.generate_block = generate_block
    session._append = append  # type: ignore[method-assign]
    session._last = (ViewSpec(top_k=2), StepView(logprobs=np.array([-0.1, -2.0]), token_ids=np.array([5, 3])))
    view = await session.view(held, ViewSpec(full=True))
    if rewound:
        assert sent == [([8], 7)] and not one_offs
        assert view.logprobs[7] == -3.0 and session.context == tuple(held) and engine.rewinds == 1
    else:
        assert not sent and one_offs == [tuple(held)] and engine.rewinds == 0


def test_a_grouped_step_adds_its_group_to_a_copy_of_the_cached_parameters() -> None:
    from alignd.decoders.contract import ViewSpec
    from alignd.server.engines.vllm_local import LocalVLLMEngine
    from alignd.server.engines.vllm_plugin import STEP_GROUP_KEY
    from alignd.server.settings import ModelSettings

    engine = LocalVLLMEngine("m", ModelSettings(path="/nowhere"))
    want = ViewSpec(top_k=4)
    plain = engine.session_params(want)
    first = engine.session_params(want, {STEP_GROUP_KEY: ["g1", 2]})
    second = engine.session_params(want, {STEP_GROUP_KEY: ["g2", 3]})
    assert engine.session_params(want) is plain and STEP_GROUP_KEY not in plain.extra_args
    assert first.extra_args[STEP_GROUP_KEY] == ["g1", 2] and second.extra_args[STEP_GROUP_KEY] == ["g2", 3]
    # everything else is the cached step's: the view asked for, and alignd's own flags
    for grouped in (first, second):
        assert grouped.logprobs == plain.logprobs == 4 and grouped.max_tokens == 1
        assert {k: v for k, v in grouped.extra_args.items() if k != STEP_GROUP_KEY} == plain.extra_args

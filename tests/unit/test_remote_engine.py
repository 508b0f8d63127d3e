"""Unit tests for the remote vLLM engine against a scripted vLLM server (``httpx.MockTransport``).

The fake answers the way vLLM 0.32's OpenAI server does (shapes copied from real answers): retries,
error mapping, token-id parsing, views, streaming and cancellation are checked without any engine.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from alignd.decoders.contract import GenerateOp, SamplingOptions, ScoreOp, ViewSpec
from alignd.server.engines.base import EngineUnavailable, InvalidEngineRequest, SamplingSpec, StructuredSpec
from alignd.server.engines.vllm_remote import RemoteOptions, RemoteVLLMEngine, parse_token_id
from alignd.server.settings import ModelSettings

VOCAB = 8
FAST = RemoteOptions(start_timeout=2.0, retries=2, backoff=0.001, backoff_max=0.002, health_interval=0)


def _row(pairs: dict[int, float]) -> dict[str, float]:
    return {f"token_id:{t}": lp for t, lp in pairs.items()}


def _dist(context: list[int]) -> dict[int, float]:
    """A deterministic next-token distribution of the fake model (depends on the context length)."""
    logits = np.array([((len(context) * 7 + t * 3) % VOCAB) for t in range(VOCAB)], dtype=np.float64)
    lps = logits - np.log(np.exp(logits).sum())
    return {t: float(lps[t]) for t in range(VOCAB)}


def _select(dist: dict[int, float], body: dict[str, Any], sampled: int) -> dict[int, float]:
    """What vLLM returns for one position: the sampled token plus top-k, chosen ids or everything."""
    k = body.get("logprobs")
    if body.get("logprob_token_ids"):
        keep = set(body["logprob_token_ids"])
    elif k == -1:
        keep = set(dist)
    else:
        keep = {t for t, _ in sorted(dist.items(), key=lambda kv: -kv[1])[: k or 0]}
    keep.add(sampled)
    return {t: dist[t] for t in sorted(keep, key=lambda t: -dist[t])}


class FakeVLLM:
    """A scripted vLLM OpenAI server: routes, a queue of failures, and a log of what it received."""

    def __init__(self, tmp_path: Path) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.failures: list[Callable[[], httpx.Response]] = []  # served first, one per request
        self.ignore_logprob_token_ids = False
        self.stream_closed = asyncio.Event()
        self.stream_gate: asyncio.Event | None = None
        self.path = tmp_path / "model"
        self.path.mkdir()
        (self.path / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": [7, 6]}))

    def settings(self, **extra: Any) -> ModelSettings:
        return ModelSettings(path=str(self.path), engine="remote", url="http://remote:8000/v1",
                             served_name="fake", **extra)

    def engine(self, **extra: Any) -> RemoteVLLMEngine:
        return RemoteVLLMEngine("m", self.settings(**extra), options=FAST, transport=httpx.MockTransport(self))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body: Any = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        if self.failures:
            return self.failures.pop(0)()
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake", "max_model_len": 64}]})
        if request.url.path == "/classify":
            data = [{"index": i, "label": "LABEL_0", "probs": [len(t) - 2.5], "num_classes": 1}
                    for i, t in enumerate(body["input"])]
            return httpx.Response(200, json={"data": list(reversed(data))})
        assert request.url.path == "/v1/completions"
        assert body["model"] == "fake"
        if body.get("stream"):
            return httpx.Response(200, stream=_Stream(self, body), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=self.completion(body))

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.ignore_logprob_token_ids:
            body = {k: v for k, v in body.items() if k != "logprob_token_ids"}
        context = list(body["prompt"])
        token_ids, rows = [], []
        for _ in range(body["max_tokens"]):
            dist = _dist(context)
            tid = max(dist, key=lambda t: dist[t])
            token_ids.append(tid)
            rows.append(_row(_select(dist, body, tid)))
            context.append(tid)
        choice: dict[str, Any] = {
            "index": 0, "text": "x" * len(token_ids), "finish_reason": "length", "stop_reason": None,
            "token_ids": token_ids, "prompt_token_ids": body["prompt"],
            "logprobs": {"tokens": [f"token_id:{t}" for t in token_ids],
                         "token_logprobs": [r[f"token_id:{t}"] for r, t in zip(rows, token_ids)],
                         "top_logprobs": rows, "text_offset": [0] * len(token_ids)},
            "prompt_logprobs": None,
        }
        if body.get("prompt_logprobs") is not None:
            prompt = body["prompt"]
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": lp, "rank": 1, "decoded_token": "?"}
                 for t, lp in _select(_dist(prompt[:i]), {"logprobs": body["prompt_logprobs"]}, prompt[i]).items()}
                for i in range(1, len(prompt))
            ]
        return {"id": "cmpl-1", "object": "text_completion", "model": "fake", "choices": [choice]}


class _Stream(httpx.AsyncByteStream):
    """Two SSE chunks per choice, then [DONE]; waits on the fake's gate if one is set."""

    def __init__(self, fake: FakeVLLM, body: dict[str, Any]) -> None:
        self.fake, self.body = fake, body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for step in range(2):
            for index in range(self.body["n"]):
                if self.fake.stream_gate is not None:
                    await self.fake.stream_gate.wait()
                tid = 3 + index + step
                choice = {"index": index, "text": f"<{tid}>", "token_ids": [tid],
                          "finish_reason": "length" if step == 1 else None, "stop_reason": None,
                          "logprobs": {"tokens": [f"token_id:{tid}"], "token_logprobs": [-0.5],
                                       "top_logprobs": [{f"token_id:{tid}": -0.5, "token_id:1": -1.5,
                                                         "token_id:2": -0.25}], "text_offset": [0]}}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.fake.stream_closed.set()


def _error(status: int, message: str = "bad", param: str | None = None) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(status, json={"error": {"message": message, "type": "BadRequestError",
                                                          "param": param, "code": status}})


def _refused() -> httpx.Response:
    raise httpx.ConnectError("connection refused")


@pytest.fixture
def fake(tmp_path: Path) -> FakeVLLM:
    return FakeVLLM(tmp_path)


@pytest.fixture
async def engine(fake: FakeVLLM) -> AsyncIterator[RemoteVLLMEngine]:
    eng = fake.engine()
    await eng.start()
    fake.calls.clear()
    yield eng
    await eng.shutdown()


# ---- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "plain", "expected"),
    [("token_id:123", False, 123), (" token_id:0 ", False, 0), (17, False, 17), ("123", False, None),
     ("123", True, 123), ("token_id:-1", False, None), ("hello", True, None), ("token_id:", False, None),
     (True, False, None)],
)
def test_parse_token_id(key: str | int, plain: bool, expected: int | None) -> None:
    assert parse_token_id(key, plain=plain) == expected


def test_options_reject_unknown_keys(fake: FakeVLLM) -> None:
    with pytest.raises(ValueError, match="enforce_eager"):
        RemoteVLLMEngine("m", fake.settings(vllm={"enforce_eager": True}))
    eng = RemoteVLLMEngine("m", fake.settings(vllm={"retries": 7, "start_timeout": 3}))
    assert eng.options.retries == 7 and eng.options.start_timeout == 3
    assert eng.base_url == "http://remote:8000"


# ---- start-up and health ------------------------------------------------------------------------------


async def test_start_waits_for_the_remote_and_reads_facts(fake: FakeVLLM) -> None:
    fake.failures = [_refused, _error(503), _refused]
    eng = fake.engine(max_model_len=128)
    await eng.start()
    try:
        assert eng.ready
        assert eng.info.vocab_size == VOCAB and eng.info.eos_token_ids == {6, 7}
        assert eng.info.max_model_len == 64  # the smaller of remote (64) and config (128)
    finally:
        await eng.shutdown()
    assert not eng.ready


async def test_start_gives_up_after_its_timeout(fake: FakeVLLM) -> None:
    fake.failures = [_refused] * 1000
    eng = RemoteVLLMEngine("m", fake.settings(), transport=httpx.MockTransport(fake),
                           options=RemoteOptions(start_timeout=0.6, health_interval=0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EngineUnavailable, match="did not answer within"):
        await eng.start()
    assert loop.time() - started < 3
    await eng.shutdown()


async def test_start_names_the_served_models_when_the_name_is_wrong(fake: FakeVLLM) -> None:
    eng = RemoteVLLMEngine("m", fake.settings().model_copy(update={"served_name": "other"}), options=FAST,
                           transport=httpx.MockTransport(fake))
    with pytest.raises(EngineUnavailable, match=r"serves \['fake'\], not 'other'"):
        await eng.start()
    await eng.shutdown()


async def test_vocab_size_probed_from_the_remote_without_a_config(fake: FakeVLLM) -> None:
    (fake.path / "config.json").unlink()
    eng = fake.engine()
    await eng.start()
    try:
        assert eng.info.vocab_size == VOCAB and eng.info.eos_token_ids == frozenset()
        assert fake.calls[-1][2]["logprobs"] == -1
    finally:
        await eng.shutdown()


async def test_health_check_tracks_the_remote(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    await engine.check_health()
    fake.failures = [_error(503)]
    with pytest.raises(EngineUnavailable, match="unhealthy"):
        await engine.check_health()
    assert not engine.ready
    await engine.check_health()
    assert engine.ready


async def test_background_probe_restores_readiness(fake: FakeVLLM) -> None:
    eng = RemoteVLLMEngine("m", fake.settings(), transport=httpx.MockTransport(fake),
                           options=RemoteOptions(retries=0, health_interval=0.05))
    await eng.start()
    try:
        fake.failures = [_refused]
        with pytest.raises(EngineUnavailable):
            await eng.score("r", ScoreOp("base", (1, 2), 1, ViewSpec(top_k=1)))
        assert not eng.ready
        for _ in range(100):
            if eng.ready:
                break
            await asyncio.sleep(0.02)
        assert eng.ready
    finally:
        await eng.shutdown()


# ---- retries and error mapping ------------------------------------------------------------------------


async def test_transient_failures_are_retried(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    fake.failures = [_refused, _error(502)]
    view = await engine.open_session("r").view((1, 2, 3), ViewSpec(top_k=2))
    assert len(fake.calls) == 3 and view.token_ids is not None and len(view.token_ids) == 2
    assert engine.ready


async def test_retries_are_bounded_and_mark_the_engine_down(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    fake.failures = [_error(503)] * 10
    with pytest.raises(EngineUnavailable, match="after 3 attempt"):
        await engine.open_session("r").view((1, 2), ViewSpec(top_k=1))
    assert len(fake.calls) == 3
    assert not engine.ready


@pytest.mark.parametrize("status", [400, 422])
async def test_bad_requests_are_not_retried(engine: RemoteVLLMEngine, fake: FakeVLLM, status: int) -> None:
    if status == 400:
        fake.failures = [_error(400, "temperature must be non-negative", "temperature")]
    else:
        fake.failures = [lambda: httpx.Response(422, json={"detail": [{"loc": ["body", "prompt"], "msg": "bad"}]})]
    with pytest.raises(InvalidEngineRequest) as info:
        await engine.generate_block("r", GenerateOp("base", (1,), 2))
    assert info.value.param == ("temperature" if status == 400 else "prompt")
    assert len(fake.calls) == 1 and engine.ready


@pytest.mark.parametrize("status", [401, 404, 429, 500])
async def test_other_statuses_are_unavailable_without_retry(
    engine: RemoteVLLMEngine, fake: FakeVLLM, status: int
) -> None:
    fake.failures = [_error(status, "nope")]
    with pytest.raises(EngineUnavailable, match=f"answered {status}: nope"):
        await engine.reward("r", ["a"])
    assert len(fake.calls) == 1


async def test_a_read_timeout_is_not_retried(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    def slow() -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    fake.failures = [slow]
    with pytest.raises(EngineUnavailable, match="timed out"):
        await engine.score("r", ScoreOp("base", (1, 2), 1, ViewSpec(top_k=1)))
    assert len(fake.calls) == 1


# ---- views, blocks, scores, rewards -------------------------------------------------------------------


async def test_session_views(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    session = engine.open_session("r")
    dist = _dist([1, 2, 3])
    full = await session.view([1, 2, 3], ViewSpec(full=True))
    assert full.is_full and np.allclose(full.logprobs, [dist[t] for t in range(VOCAB)])
    assert await session.view([1, 2, 3], ViewSpec(full=True)) is full  # same step: no new request
    top = await session.view([1, 2, 3], ViewSpec(top_k=3))  # derived from the full row: no new request
    assert list(top.token_ids) == sorted(dist, key=lambda t: -dist[t])[:3] and len(fake.calls) == 1
    nxt = _dist([1, 2, 3, 4])
    top = await session.view([1, 2, 3, 4], ViewSpec(top_k=3))
    assert list(top.token_ids) == sorted(nxt, key=lambda t: -nxt[t])[:3] and len(fake.calls) == 2
    one = await session.view([1, 2, 3, 4], ViewSpec(top_k=1))  # narrower than the last view: no new request
    assert list(one.token_ids) == list(top.token_ids[:1]) and len(fake.calls) == 2
    chosen = await session.view([1, 2, 3], ViewSpec(token_ids=(5, 2)))
    assert fake.calls[-1][2]["logprob_token_ids"] == [2, 5] and fake.calls[-1][2]["logprobs"] == 2
    assert set(chosen.token_ids) == {2, 5} and chosen.logprob_of(5) == pytest.approx(dist[5])
    both = await session.view([1, 2, 3], ViewSpec(top_k=1, token_ids=(5,)))
    assert fake.calls[-1][2]["logprobs"] == -1
    assert set(both.token_ids) == {5, max(dist, key=lambda t: dist[t])}
    assert all(body["max_tokens"] == 1 and body["temperature"] == 0 for _, _, body in fake.calls)
    await session.close()


async def test_ignored_logprob_token_ids_fall_back_to_full_rows(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    fake.ignore_logprob_token_ids = True
    view = await engine.open_session("r").view([4], ViewSpec(token_ids=(1, 2)))
    assert set(view.token_ids) == {1, 2}
    assert fake.calls[-1][2]["logprobs"] == -1
    await engine.open_session("r").view([4], ViewSpec(token_ids=(1,)))
    assert "logprob_token_ids" not in fake.calls[-1][2]  # remembered


async def test_generate_block(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    op = GenerateOp("base", (1, 2), 3, ViewSpec(top_k=1), SamplingOptions(temperature=0.5, seed=9),
                    stop_token_ids=(7,))
    block = await engine.generate_block("r", op)
    body = fake.calls[-1][2]
    assert body["stop_token_ids"] == [7] and body["seed"] == 9 and body["temperature"] == 0.5
    assert body["return_tokens_as_token_ids"] is True
    assert len(block.token_ids) == 3 and len(block.views) == 3 and not block.finished
    assert [v.top()[0] for v in block.views] == block.token_ids


async def test_score(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    context = (1, 2, 3, 4)
    views = await engine.score("r", ScoreOp("base", context, 2, ViewSpec(top_k=1)))
    assert fake.calls[-1][2]["prompt_logprobs"] == 1
    assert len(views) == 3
    for i, view in zip(range(2, 5), views):
        dist = _dist(list(context[:i]))
        assert view.top() == (max(dist, key=lambda t: dist[t]), pytest.approx(max(dist.values())))
    chosen = await engine.score("r", ScoreOp("base", context, 1, ViewSpec(token_ids=(6,))))
    assert fake.calls[-1][2]["prompt_logprobs"] == -1
    assert [list(v.token_ids) for v in chosen] == [[6]] * 4
    with pytest.raises(InvalidEngineRequest):
        await engine.score("r", ScoreOp("base", context, 0, ViewSpec(top_k=1)))


async def test_reward_is_the_raw_score_in_order(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    assert await engine.reward("r", ["ab", "abcd"]) == [-0.5, 1.5]
    assert fake.calls[-1][1] == "/classify" and fake.calls[-1][2]["use_activation"] is False


async def test_clamped_and_null_logprobs_read_as_minus_infinity(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    row = {"token_id:1": -0.1, "token_id:2": -9999.0}
    answer = {"choices": [{"index": 0, "token_ids": [1], "finish_reason": "length",
                           "logprobs": {"token_logprobs": [-0.1], "top_logprobs": [row]},
                           "prompt_logprobs": [None, {"1": {"logprob": None}, "3": {"logprob": -2.0}}]}]}
    fake.failures = [lambda: httpx.Response(200, json=answer)]
    views = await engine.score("r", ScoreOp("base", (0, 1), 1, ViewSpec(full=True)))
    assert views[0].logprobs[1] == -math.inf and views[0].logprobs[3] == -2.0
    assert views[1].logprobs[2] == -math.inf and views[1].logprobs[1] == pytest.approx(-0.1)


async def test_logprobs_keyed_by_text_are_refused(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    answer = {"choices": [{"index": 0, "token_ids": [1], "logprobs": {"top_logprobs": [{" the": -0.1}]}}]}
    fake.failures = [lambda: httpx.Response(200, json=answer)]
    with pytest.raises(EngineUnavailable, match="not a token id"):
        await engine.open_session("r").view([1], ViewSpec(top_k=1))


# ---- native generation --------------------------------------------------------------------------------


async def test_generate_streams_and_translates_the_spec(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    spec = SamplingSpec(max_tokens=2, n=2, temperature=0.7, seed=5, stop=["\n"], logprobs=1,
                        logit_bias={3: 1.5}, structured=StructuredSpec("regex", "a+"))
    updates = [u async for u in engine.generate("r", [1, 2], spec)]
    body = fake.calls[-1][2]
    assert body["stream"] is True and body["prompt"] == [1, 2] and body["n"] == 2 and body["seed"] == 5
    assert body["logit_bias"] == {"3": 1.5} and body["stop"] == ["\n"]
    assert body["structured_outputs"] == {"regex": "a+", "disable_any_whitespace": True}
    assert body["return_tokens_as_token_ids"] and body["return_token_ids"]
    deltas = [c for u in updates for c in u.choices]
    assert [(c.index, c.token_ids) for c in deltas] == [(0, [3]), (1, [4]), (0, [4]), (1, [5])]
    assert deltas[0].logprobs is not None and deltas[0].logprobs[0].top == [(2, -0.25)]
    assert deltas[0].logprobs[0].logprob == -0.5
    assert [u.finished for u in updates] == [False, False, False, True]
    assert fake.stream_closed.is_set()


async def test_generate_with_prompt_logprobs_is_one_answer(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    spec = SamplingSpec(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    (update,) = [u async for u in engine.generate("r", [1, 2, 3], spec)]
    assert "stream" not in fake.calls[-1][2]
    assert update.prompt_logprobs is not None and update.prompt_logprobs[0] is None
    assert [lp.token_id for lp in update.prompt_logprobs[1:]] == [2, 3]  # type: ignore[union-attr]
    assert update.finished and update.choices[0].token_ids


async def test_cancelling_generation_closes_the_stream(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    fake.stream_gate = asyncio.Event()
    fake.stream_gate.set()
    gen = engine.generate("r", [1], SamplingSpec(max_tokens=2))
    first = await gen.__anext__()
    assert first.choices[0].token_ids == [3]
    fake.stream_gate.clear()  # the remote is now "busy" writing the next token
    task = asyncio.create_task(gen.__anext__())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gen.aclose()
    assert fake.stream_closed.is_set()


async def test_an_error_event_mid_stream_is_mapped(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    events = b'data: {"error": {"message": "boom", "type": "BadRequestError", "param": "stop", "code": 400}}\n\n'
    fake.failures = [lambda: httpx.Response(200, content=events)]
    with pytest.raises(InvalidEngineRequest) as info:
        [u async for u in engine.generate("r", [1], SamplingSpec(max_tokens=2))]
    assert info.value.param == "stop"
    events = b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    fake.failures = [lambda: httpx.Response(200, content=events)]
    with pytest.raises(EngineUnavailable, match="engine died"):
        [u async for u in engine.generate("r", [1], SamplingSpec(max_tokens=2))]


async def test_a_remote_that_is_down_fails_fast(engine: RemoteVLLMEngine, fake: FakeVLLM) -> None:
    fake.failures = [_refused] * 10
    with pytest.raises(EngineUnavailable, match="unavailable after 3 attempt"):
        [u async for u in engine.generate("r", [1], SamplingSpec(max_tokens=2))]
    assert not engine.ready

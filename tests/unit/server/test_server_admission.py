"""Who gets in and when: API keys, loading and dead engines, the concurrency limit, body size, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
COMPLETION = {"model": "tiny-base", "prompt": "The capital of France", "max_tokens": 4}


async def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_api_keys_guard_the_api_but_not_health_metrics_or_page(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    settings = make_settings(server={"api_keys": ["sk-right", "sk-other"]})
    async with serve(settings, fake_engines()) as h:
        missing = await h.client.post("/v1/chat/completions", json=CHAT)
        err = assert_error(missing, 401, "invalid_api_key")
        assert err["type"] == "authentication_error"
        assert "Missing" in err["message"]
        wrong = await h.client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"}
        )
        assert "Incorrect API key" in assert_error(wrong, 401, "invalid_api_key")["message"]
        not_bearer = await h.client.post(
            "/v1/completions", json=COMPLETION, headers={"Authorization": "sk-right"}
        )
        assert_error(not_bearer, 401, "invalid_api_key")
        assert_error(await h.client.get("/v1/models"), 401, "invalid_api_key")
        assert_error(await h.client.post("/tokenize", json={"model": "tiny-base", "prompt": "a"}), 401)

        for key in ("sk-right", "sk-other"):
            auth = {"Authorization": f"Bearer {key}"}
            ok = await h.client.post("/v1/chat/completions", json=CHAT, headers=auth)
            assert ok.status_code == 200, ok.text
            assert ok.json()["object"] == "chat.completion"
        models = await h.client.get("/v1/models", headers={"Authorization": "bearer sk-right"})
        assert models.status_code == 200
        assert {m["id"] for m in models.json()["data"]} == {"tiny-base", "tiny-chat", "tiny-amateur"}

        assert (await h.client.get("/health")).status_code == 200
        metrics = await h.client.get("/metrics")
        assert metrics.status_code == 200 and "alignd_requests" in metrics.text
        page = await h.client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_loading_engines_answer_503_then_serve(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    engines = fake_engines(hold_start=True)
    async with serve(make_settings(), engines, wait=False) as h:
        health = await h.client.get("/health")
        assert_error(health, 503, "loading")
        busy = await h.client.post("/v1/completions", json=COMPLETION)
        assert_error(busy, 503)
        assert "Retry-After" in busy.headers
        stream = await h.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert_error(stream, 503)
        cards = (await h.client.get("/v1/models")).json()["data"]
        assert [c["alignd"]["ready"] for c in cards] == [False, False, False]

        for engine in engines.values():
            engine.finish_start()
        await h.started()
        assert (await h.client.get("/health")).json() == {
            "status": "ok",
            "models": ["tiny-base", "tiny-chat", "tiny-amateur"],
        }
        done = await h.client.post("/v1/completions", json=COMPLETION)
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["completion_tokens"] >= 1
        assert all(c["alignd"]["ready"] for c in (await h.client.get("/v1/models")).json()["data"])


async def test_a_model_that_fails_to_start_leaves_the_server_unhealthy(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    engines = fake_engines()
    engines["tiny-chat"].fail_on_start = "out of memory"
    async with serve(make_settings(), engines) as h:
        err = assert_error(await h.client.get("/health"), 503)
        assert "start-up failed" in err["message"] and "out of memory" in err["message"]
        assert_error(await h.client.post("/v1/chat/completions", json=CHAT), 503)


async def test_a_dead_engine_answers_503(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    async with serve(make_settings(), fake_engines()) as h:
        assert (await h.client.get("/health")).status_code == 200
        h.engines["tiny-base"].die()
        assert_error(await h.client.get("/health"), 503, "engine_unavailable")
        assert_error(await h.client.post("/v1/completions", json=COMPLETION), 503)
        assert_error(await h.client.post("/v1/completions", json={**COMPLETION, "stream": True}), 503)
        # The other models still serve.
        assert (await h.client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        metrics = (await h.client.get("/metrics")).text
        assert 'alignd_engine_up{model="tiny-base"} 0.0' in metrics
        assert 'alignd_engine_up{model="tiny-chat"} 1.0' in metrics


async def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_event(
    serve: Any, make_settings: Any, fake_engines: Any, sse_events: Any
) -> None:
    async with serve(make_settings(), fake_engines(token_delay=0.01)) as h:
        engine = h.engines["tiny-base"]
        body = {**COMPLETION, "max_tokens": 400, "ignore_eos": True, "stream": True}
        request = asyncio.create_task(h.client.post("/v1/completions", json=body))
        await _wait_for(lambda: bool(engine.active))
        await asyncio.sleep(0.05)
        engine.die()
        response = await request
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == 503 and "died" in error["message"]
        assert all("choices" in e for e in events[:-2])
        assert h.app.state.in_flight == 0


async def test_the_concurrency_limit_answers_429(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    settings = make_settings(server={"max_concurrent_requests": 1})
    async with serve(settings, fake_engines(token_delay=0.01)) as h:
        engine = h.engines["tiny-base"]
        slow = asyncio.create_task(
            h.client.post("/v1/completions", json={**COMPLETION, "max_tokens": 60, "ignore_eos": True})
        )
        await _wait_for(lambda: bool(engine.active))
        full = await h.client.post("/v1/chat/completions", json=CHAT)
        err = assert_error(full, 429, "rate_limit_exceeded")
        assert err["type"] == "rate_limit_error"
        assert "Retry-After" in full.headers
        assert not slow.done()
        assert (await slow).status_code == 200
        assert (await h.client.post("/v1/chat/completions", json=CHAT)).status_code == 200

        # A stream holds its slot until its last chunk.
        stream = asyncio.create_task(
            h.client.post(
                "/v1/completions", json={**COMPLETION, "max_tokens": 60, "ignore_eos": True, "stream": True}
            )
        )
        await _wait_for(lambda: bool(engine.active))
        assert_error(await h.client.post("/v1/completions", json=COMPLETION), 429)
        assert (await stream).status_code == 200
        assert h.app.state.in_flight == 0


async def test_oversized_bodies_answer_413(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    async with serve(make_settings(server={"max_body_bytes": 2048}), fake_engines()) as h:
        big = {**COMPLETION, "prompt": "x" * 4000}
        assert_error(await h.client.post("/v1/completions", json=big), 413, "request_too_large")
        assert_error(await h.client.post("/tokenize", json={"model": "tiny-base", "prompt": "y" * 4000}), 413)

        async def chunked() -> AsyncIterator[bytes]:
            # No Content-Length: the limit must hold on the bytes actually read.
            yield b'{"model": "tiny-base", "prompt": "'
            for _ in range(10):
                yield b"z" * 300
            yield b'", "max_tokens": 2}'

        response = await h.client.post(
            "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "request_too_large")
        assert (await h.client.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_client_errors_leave_as_openai_error_bodies(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    async with serve(make_settings(), fake_engines()) as h:
        bad_json = await h.client.post(
            "/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}
        )
        assert assert_error(bad_json, 400, "invalid_json")["type"] == "invalid_request_error"
        unknown = assert_error(
            await h.client.post("/v1/completions", json={**COMPLETION, "model": "nope"}), 404
        )
        assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
        bad_param = assert_error(
            await h.client.post("/v1/completions", json={**COMPLETION, "temperature": 9}), 400
        )
        assert bad_param["param"] == "temperature"
        too_long = await h.client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5000})
        assert_error(too_long, 400, "context_length_exceeded")
        bad_recipe = await h.client.post(
            "/v1/completions", json={**COMPLETION, "alignment": {"decoder": "no-such-decoder"}}
        )
        assert assert_error(bad_recipe, 400)["param"] == "alignment.decoder"
        assert_error(await h.client.get("/v1/no-such-route"), 404)


async def test_bad_speculative_settings_answer_400_naming_the_parameter(
    serve: Any, make_settings: Any, fake_engines: Any, assert_error: Any
) -> None:
    roles = {"expert": "tiny-base", "amateur": "tiny-chat"}

    def contrastive(speculative: dict[str, Any]) -> dict[str, Any]:
        alignment = {"decoder": "contrastive", "roles": roles, "params": {"speculative": speculative}}
        return {**COMPLETION, "alignment": alignment}

    async with serve(make_settings(), fake_engines()) as h:
        method = assert_error(await h.client.post("/v1/completions", json=contrastive({"method": "medusa"})), 400)
        assert method["param"] == "alignment.params.speculative.method"
        lookup = {"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}
        bounds = assert_error(await h.client.post("/v1/completions", json=contrastive(lookup)), 400)
        assert bounds["param"] == "alignment.params.speculative" and "prompt_lookup_min" in bounds["message"]
        nudging = {**COMPLETION, "alignment": {
            "decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
            "params": {"speculative": {"method": "ngram"}},
        }}
        extra = assert_error(await h.client.post("/v1/completions", json=nudging), 400)
        assert extra["param"] == "alignment.params.speculative"
        served = await h.client.post("/v1/completions", json=contrastive({"method": "ngram"}))
        assert served.status_code == 200, served.text

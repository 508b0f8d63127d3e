"""``Client`` and ``AsyncClient`` against a fake server: bodies, results, errors and retries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from alignd.client import (
    AlignError,
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    Client,
    Completion,
    NotFoundError,
    Nudging,
    PayloadTooLargeError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)

from .conftest import DECODERS, MODELS, FakeServer, chat_result, completion_result, error_body, span


def make_client(server: FakeServer, **kwargs: Any) -> Client:
    return Client("http://alignd.test", transport=server.transport, **kwargs)


# ---- configuration --------------------------------------------------------------------------------------


def test_base_url_and_api_key_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, server: FakeServer
) -> None:
    monkeypatch.setenv("ALIGND_BASE_URL", "http://env.test:9000/v1/")
    monkeypatch.setenv("ALIGND_API_KEY", "sekrit")
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    client = Client(transport=server.transport)
    assert client.base_url == "http://env.test:9000"
    client.models()
    request = server.requests[0]
    assert str(request.url) == "http://env.test:9000/v1/models"
    assert request.headers["authorization"] == "Bearer sekrit"
    assert request.headers["user-agent"].startswith("alignd-client/")


def test_defaults_without_environment(server: FakeServer) -> None:
    client = Client(transport=server.transport)
    assert client.base_url == "http://127.0.0.1:8000"
    assert client.api_key is None
    assert "authorization" not in client.headers
    assert Client("http://x", api_key="k", transport=server.transport).headers["authorization"] == "Bearer k"


# ---- request bodies -------------------------------------------------------------------------------------


def test_chat_with_a_model_sends_openai_fields_and_drops_none(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("Hi!")))
    result = make_client(server).chat(
        "Hello", model="tiny-chat", system="Be brief.", max_tokens=8, temperature=None, seed=1
    )
    assert server.body() == {
        "model": "tiny-chat",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "seed": 1,
        "stream": False,
    }
    assert isinstance(result, ChatCompletion)
    assert result.text == "Hi!"
    assert result.finish_reason == "stop"
    assert result.usage is not None and result.usage.total_tokens == 7
    assert result.spans == [] and result.role_token_share == {}


def test_chat_with_a_recipe_object_sends_alignment_and_first_role_as_model(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("ok")))
    messages = [{"role": "user", "content": "Q"}]
    make_client(server).chat(
        messages, recipe=Nudging(base="tiny-base", aligner="tiny-chat", gamma=0.3), trace=True
    )
    body = server.body()
    assert body["model"] == "tiny-base"
    assert body["messages"] == messages
    assert body["alignment"] == {
        "decoder": "nudging",
        "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
        "params": {"gamma": 0.3},
        "trace": True,
    }


def test_named_recipe_is_the_model_and_trace_alone_is_sent(server: FakeServer) -> None:
    server.on("POST", "/v1/completions", httpx.Response(200, json=completion_result("x")))
    client = make_client(server)
    client.complete("Once", recipe="tiny-nudging", trace=True)
    assert server.body() == {
        "model": "tiny-nudging",
        "prompt": "Once",
        "stream": False,
        "alignment": {"trace": True},
    }
    client.complete("Once", model="tiny-base")
    assert "alignment" not in server.body()


def test_alignment_dict_and_extra_body(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("ok")))
    alignment = {"decoder": "urial", "roles": {"base": "tiny-base"}, "params": {}}
    make_client(server).chat("Q", recipe=alignment, extra_body={"top_k": 5})
    body = server.body()
    assert body["model"] == "tiny-base" and body["alignment"] == alignment and body["top_k"] == 5


def test_recipe_params_override_named_recipes_and_merge_with_builders(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, json=chat_result("ok")))
    client = make_client(server)
    client.chat("Q", recipe="tiny-nudging", recipe_params={"gamma": 0.1}, trace=True)
    assert server.body()["alignment"] == {"params": {"gamma": 0.1}, "trace": True}
    client.chat("Q", recipe=Nudging(base="a", aligner="b", gamma=0.3), recipe_params={"extra": 1})
    assert server.body()["alignment"]["params"] == {"gamma": 0.3, "extra": 1}
    client.chat("Q", model="tiny-chat", recipe={"decoder": "urial"})  # no roles: the model plays them all
    assert server.body()["model"] == "tiny-chat" and server.body()["alignment"] == {"decoder": "urial"}


def test_bad_target_arguments_raise_before_sending(server: FakeServer) -> None:
    client = make_client(server)
    with pytest.raises(ValueError, match="model="):
        client.chat("Q")
    with pytest.raises(ValueError, match="not both"):
        client.chat("Q", model="a", recipe="b")
    with pytest.raises(TypeError):
        client.chat("Q", recipe=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one role"):
        client.chat("Q", recipe={"decoder": "urial"})
    assert server.requests == []


# ---- results --------------------------------------------------------------------------------------------


def test_trace_spans_and_role_share_are_typed(server: FakeServer) -> None:
    spans = [
        span("The sky", "base", "base top-1 p=0.91", [1, 2]),
        span(" is blue.", "aligner", "nudged", [3, 4, 5]),
    ]
    server.on(
        "POST",
        "/v1/chat/completions",
        httpx.Response(
            200, json=chat_result("The sky is blue.", spans=spans, share={"base": 0.4, "aligner": 0.6})
        ),
    )
    result = make_client(server).chat("Q", model="rec", trace=True)
    assert [(s.text, s.role, s.reason, s.token_ids) for s in result.spans] == [
        ("The sky", "base", "base top-1 p=0.91", [1, 2]),
        (" is blue.", "aligner", "nudged", [3, 4, 5]),
    ]
    assert result.role_token_share == {"base": 0.4, "aligner": 0.6}


def test_role_share_is_computed_from_spans_when_the_server_omits_it(server: FakeServer) -> None:
    spans = [span("a", "base", token_ids=[1]), span("bcd", "aligner", token_ids=[2, 3, 4])]
    server.on("POST", "/v1/completions", httpx.Response(200, json=completion_result("abcd", spans=spans)))
    result = make_client(server).complete("Q", model="rec", trace=True)
    assert isinstance(result, Completion)
    assert result.text == "abcd" and result.finish_reason == "length"
    assert result.role_token_share == {"base": 0.25, "aligner": 0.75}


def test_models_decoders_and_health(server: FakeServer) -> None:
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    server.on("GET", "/v1/alignment/decoders", httpx.Response(200, json=DECODERS["data"]))  # a bare list too
    server.on("GET", "/health", httpx.Response(200, text="ok"))
    client = make_client(server)
    models = client.models()
    assert [m.id for m in models] == ["tiny-base", "tiny-chat", "tiny-nudging"]
    recipe = models[2]
    assert recipe.is_recipe and recipe.kind == "recipe" and recipe.alignd.decoder == "nudging"
    assert recipe.alignd.role_models() == {"base": "tiny-base", "aligner": "tiny-chat"}
    assert models[0].alignd.base_model and not models[0].is_recipe
    assert models[0].alignd.task == "generate" and models[0].alignd.ready
    assert recipe.alignd.base_model is None and recipe.alignd.params == {"gamma": 0.4}
    decoders = client.decoders()
    assert [d.name for d in decoders] == ["nudging", "args"]
    assert decoders[1].roles[1].task == "reward" and decoders[1].roles[1].optional
    assert decoders[0].param_defaults() == {"gamma": 0.4}
    assert client.health().status == "ok"


def test_unreadable_success_body_is_a_response_error(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", httpx.Response(200, text="<html>proxy</html>"))
    with pytest.raises(APIResponseError, match="unexpected response"):
        make_client(server).chat("Q", model="m")


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (429, RateLimitError),
        (503, ServiceUnavailableError),
        (422, APIStatusError),
        (500, APIStatusError),
    ],
)
def test_error_statuses_map_to_exceptions(server: FakeServer, status: int, cls: type[APIStatusError]) -> None:
    body = error_body(
        "gamma must be in (0, 1)",
        "invalid_request_error",
        param="alignment.params.gamma",
        code="bad_param",
    )
    server.on("POST", "/v1/chat/completions", httpx.Response(status, json=body))
    with pytest.raises(cls) as info:
        make_client(server, max_retries=0).chat("Q", model="m")
    exc = info.value
    assert type(exc) is cls
    assert isinstance(exc, AlignError)
    assert exc.status_code == status
    assert exc.message == "gamma must be in (0, 1)"
    assert exc.type == "invalid_request_error"
    assert exc.param == "alignment.params.gamma"
    assert exc.code == "bad_param"
    assert exc.body == body
    assert str(exc) == f"{status}: gamma must be in (0, 1) (param: alignment.params.gamma)"


def test_error_without_openai_body_uses_the_text_or_reason(server: FakeServer) -> None:
    server.on(
        "GET",
        "/v1/models",
        httpx.Response(502, text="Bad gateway from nginx"),
        httpx.Response(404, content=b""),
    )
    client = make_client(server)
    with pytest.raises(APIStatusError, match="Bad gateway from nginx") as info:
        client.models()
    assert info.value.status_code == 502 and info.value.type is None
    with pytest.raises(NotFoundError, match="Not Found"):
        client.models()


# ---- retries --------------------------------------------------------------------------------------------


def test_429_and_503_are_retried_with_growing_backoff(server: FakeServer, sleeps: list[float]) -> None:
    server.on(
        "POST",
        "/v1/chat/completions",
        httpx.Response(429, json=error_body("full", "rate_limit_error")),
        httpx.Response(503, json=error_body("busy", "service_unavailable")),
        httpx.Response(200, json=chat_result("finally")),
    )
    client = make_client(server, retry=RetryPolicy(max_retries=3, initial_delay=1.0, jitter=0.0))
    assert client.chat("Q", model="m").text == "finally"
    assert len(server.requests) == 3
    assert sleeps == [1.0, 2.0]
    assert server.requests[0].content == server.requests[2].content


def test_retry_after_is_respected(server: FakeServer, sleeps: list[float]) -> None:
    server.on(
        "GET",
        "/v1/models",
        httpx.Response(503, headers={"Retry-After": "7"}),
        httpx.Response(429, headers={"retry-after-ms": "250"}),
        httpx.Response(200, json=MODELS),
    )
    make_client(server).models()
    assert sleeps == [7.0, 0.25]


def test_retries_run_out_and_raise_the_last_error(server: FakeServer, sleeps: list[float]) -> None:
    server.on("POST", "/v1/completions", httpx.Response(429, json=error_body("full", "rate_limit_error")))
    with pytest.raises(RateLimitError, match="full"):
        make_client(server, max_retries=2).complete("Q", model="m")
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_retry_after_beyond_the_cap_is_not_waited_for(server: FakeServer, sleeps: list[float]) -> None:
    server.on("GET", "/v1/models", httpx.Response(503, headers={"Retry-After": "3600"}))
    with pytest.raises(ServiceUnavailableError):
        make_client(server).models()
    assert sleeps == [] and len(server.requests) == 1


def test_other_errors_are_not_retried(server: FakeServer, sleeps: list[float]) -> None:
    server.on(
        "POST", "/v1/chat/completions", httpx.Response(400, json=error_body("bad", "invalid_request_error"))
    )
    with pytest.raises(BadRequestError):
        make_client(server).chat("Q", model="m")
    assert len(server.requests) == 1 and sleeps == []


def test_connect_errors_are_retried_then_raised(server: FakeServer, sleeps: list[float]) -> None:
    server.on("GET", "/v1/models", httpx.ConnectError("refused"), httpx.Response(200, json=MODELS))
    assert len(make_client(server).models()) == 3
    assert len(sleeps) == 1

    server.on("GET", "/v1/models", httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(APIConnectionError, match="not running at http://alignd.test") as info:
        make_client(server, max_retries=1).models()
    assert not isinstance(info.value, APITimeoutError)
    assert info.value.base_url == "http://alignd.test"


def test_read_timeouts_are_not_retried(server: FakeServer, sleeps: list[float]) -> None:
    server.on("POST", "/v1/chat/completions", httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError, match="did not answer"):
        make_client(server).chat("Q", model="m")
    assert sleeps == [] and len(server.requests) == 1


def test_health_does_not_retry(server: FakeServer, sleeps: list[float]) -> None:
    server.on("GET", "/health", httpx.Response(503, json=error_body("loading", "service_unavailable")))
    with pytest.raises(ServiceUnavailableError, match="loading"):
        make_client(server).health()
    assert sleeps == []


def test_real_refused_connection_names_the_url() -> None:
    client = Client("http://127.0.0.1:9", max_retries=0)  # port 9 (discard): nothing listens there
    with pytest.raises(APIConnectionError, match=r"not running at http://127.0.0.1:9"):
        client.health()


# ---- the async twin -------------------------------------------------------------------------------------


async def test_async_client_chat_models_and_errors(server: FakeServer, sleeps: list[float]) -> None:
    server.on(
        "POST",
        "/v1/chat/completions",
        httpx.Response(503, json=error_body("busy", "service_unavailable")),
        httpx.Response(200, json=chat_result("async hi", spans=[span("async hi", "base")])),
    )
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    server.on("GET", "/v1/alignment/decoders", httpx.Response(200, json=DECODERS))
    server.on(
        "POST", "/v1/completions", httpx.Response(401, json=error_body("no key", "authentication_error"))
    )
    server.on("GET", "/health", httpx.Response(200, json={"status": "ok", "models": 2}))
    async with AsyncClient("http://alignd.test", api_key="k", transport=server.transport) as client:
        result = await client.chat("Q", recipe=Nudging(base="a", aligner="b"), trace=True)
        assert result.text == "async hi" and result.spans[0].role == "base"
        assert len(sleeps) == 1
        assert server.body()["alignment"]["trace"] is True
        assert [m.id for m in await client.models()][-1] == "tiny-nudging"
        assert [d.name for d in await client.decoders()] == ["nudging", "args"]
        with pytest.raises(AuthenticationError, match="no key"):
            await client.complete("Q", model="m")
        assert (await client.health()).status == "ok"
    assert server.requests[0].headers["authorization"] == "Bearer k"


async def test_async_connect_error(server: FakeServer, sleeps: list[float]) -> None:
    server.on("GET", "/v1/models", httpx.ConnectError("refused"))
    async with AsyncClient("http://alignd.test", transport=server.transport, max_retries=2) as client:
        with pytest.raises(APIConnectionError, match="not running"):
            await client.models()
    assert len(sleeps) == 2 and len(server.requests) == 3


def test_user_supplied_http_client_is_not_closed(server: FakeServer) -> None:
    server.on("GET", "/v1/models", httpx.Response(200, json=MODELS))
    http = httpx.Client(transport=server.transport)
    with Client("http://alignd.test", http_client=http) as client:
        client.models()
    assert not http.is_closed
    http.close()

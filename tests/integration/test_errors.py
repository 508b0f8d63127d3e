"""Every error a client can cause answers with the OpenAI error body and the OpenAI API's status."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.engine


def _assert_error_body(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_unknown_model_is_404(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"


def test_prompt_longer_than_context(alignd_server: RunningServer) -> None:
    r = httpx.post(alignd_server.api_url + "/completions",
                   json={"model": "tiny-base", "prompt": "hello " * 5000, "max_tokens": 1})
    _assert_error_body(r, 400, code="context_length_exceeded")


def test_prompt_plus_max_tokens_beyond_context_is_not_clamped(alignd_server: RunningServer) -> None:
    r = httpx.post(alignd_server.api_url + "/completions",
                   json={"model": "tiny-base", "prompt": "hello", "max_tokens": 5000})
    _assert_error_body(r, 400, param="max_tokens", code="context_length_exceeded")


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1), ("temperature", 3), ("top_p", 0), ("n", 0), ("max_tokens", -5), ("logprobs", 50),
     ("presence_penalty", 9), ("stop", ["a", "b", "c", "d", "e"]), ("logit_bias", {"abc": 1}),
     ("logit_bias", {"1": 500}), ("seed", "x"), ("echo", "maybe"), ("nonsense_field", 1)],
)
def test_invalid_parameter_is_400_naming_it(alignd_server: RunningServer, field: str, value: object) -> None:
    body = {"model": "tiny-base", "prompt": "hello", "max_tokens": 2, field: value}
    r = httpx.post(alignd_server.api_url + "/completions", json=body)
    err = _assert_error_body(r, 400)
    assert err["param"] == field
    assert err["type"] == "invalid_request_error"


def test_chat_invalid_fields(alignd_server: RunningServer) -> None:
    base = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(alignd_server.api_url + "/chat/completions", json={**base, "top_logprobs": 3})
    _assert_error_body(r, 400)
    r = httpx.post(alignd_server.api_url + "/chat/completions", json={**base, "messages": []})
    _assert_error_body(r, 400, param="messages")
    r = httpx.post(alignd_server.api_url + "/chat/completions",
                   json={**base, "messages": [{"role": "wizard", "content": "hi"}]})
    _assert_error_body(r, 400)
    r = httpx.post(alignd_server.api_url + "/chat/completions",
                   json={**base, "response_format": {"type": "json_schema"}})
    _assert_error_body(r, 400)


def test_out_of_vocabulary_token_ids(alignd_server: RunningServer) -> None:
    r = httpx.post(alignd_server.api_url + "/completions", json={"model": "tiny-base", "prompt": [1, 99999]})
    _assert_error_body(r, 400, param="prompt")
    r = httpx.post(alignd_server.base_url + "/detokenize", json={"model": "tiny-base", "tokens": [-1]})
    _assert_error_body(r, 400, param="tokens")


def test_malformed_json_is_400(alignd_server: RunningServer) -> None:
    r = httpx.post(alignd_server.api_url + "/completions", content=b'{"model": "tiny-base", "prompt": ',
                   headers={"content-type": "application/json"})
    _assert_error_body(r, 400, code="invalid_json")
    r = httpx.post(alignd_server.api_url + "/completions", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
    _assert_error_body(r, 400)


def test_oversized_body_is_413(alignd_server: RunningServer) -> None:
    r = httpx.post(alignd_server.api_url + "/completions",
                   json={"model": "tiny-base", "prompt": "x" * (5 * 1024 * 1024)})
    _assert_error_body(r, 413)


def test_openai_client_raises_bad_request(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert info.value.body["param"] == "temperature"


def test_unknown_route_is_404_json(alignd_server: RunningServer) -> None:
    r = httpx.get(alignd_server.api_url + "/nope")
    _assert_error_body(r, 404)

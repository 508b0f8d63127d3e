"""The provenance page (``GET /``): served whole, self-contained, and its script works on real streams.

Without a browser, the script runs in Node against a minimal DOM (``page_harness.js``), fed with the
answers the app gives (fake engines); those tests need ``node`` and are skipped where it is missing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CONTRASTIVE = {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"}}
HARNESS = Path(__file__).with_name("page_harness.js")
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
NUDGING: dict[str, Any] = {
    "decoder": "nudging",
    "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
    "params": {"gamma": 0.3},
}
RECIPES = {"tiny-nudging": NUDGING, "tiny-contrastive": CONTRASTIVE}
ELEMENT_IDS = [
    "api-key",
    "reload",
    "models",
    "form",
    "model",
    "mode-chat",
    "mode-completion",
    "max-tokens",
    "temperature",
    "system",
    "prompt",
    "send",
    "stop",
    "error",
    "output",
    "legend",
    "status",
    "tooltip",
]


async def _page(serve: Any, make_settings: Any, fake_engines: Any, **server: Any) -> str:
    async with serve(make_settings(recipes=RECIPES, server=server), fake_engines()) as h:
        response = await h.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def _script(page: str) -> str:
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 1, "one inline script"
    attrs, body = scripts[0]
    assert "src" not in attrs
    return str(body)


async def test_page_is_one_self_contained_file_with_the_expected_elements(
    serve: Any, make_settings: Any, fake_engines: Any
) -> None:
    page = await _page(serve, make_settings, fake_engines, api_keys=["sk-page"])  # the page itself is public
    assert page.lstrip().lower().startswith("<!doctype html>")
    for element_id in ELEMENT_IDS:
        assert len(re.findall(rf'\bid="{re.escape(element_id)}"', page)) == 1, element_id
    assert "://" not in page, "no external resources (no CDN)"
    assert "<link" not in page and "@import" not in page
    script = _script(page)
    for needle in (
        "v1/models",
        "v1/chat/completions",
        "v1/completions",
        "stream: true",
        "trace: true",
        "alignment_trace",
        "[DONE]",
        "token_ids",
        "Authorization",
        "chunk.error",
    ):
        assert needle in script, needle
    assert ".innerHTML" not in script, "model output must never be parsed as HTML"


@needs_node
async def test_page_script_parses(serve: Any, make_settings: Any, fake_engines: Any, tmp_path: Path) -> None:
    script = tmp_path / "page.js"
    script.write_text(_script(await _page(serve, make_settings, fake_engines)))
    check = await _node("--check", str(script))
    assert check.returncode == 0, check.stderr
    broken = tmp_path / "broken.js"
    broken.write_text(script.read_text() + "\n}(")
    assert (await _node("--check", str(broken))).returncode != 0


async def _node(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [str(NODE), *args], check=False, capture_output=True, text=True, timeout=30
    )


async def _run_page(tmp_path: Path, page: str, scenario: dict[str, Any]) -> dict[str, Any]:
    """Run the page's script on ``scenario`` (see page_harness.js) and return its report."""
    (tmp_path / "index.html").write_text(page)
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    run = await _node(str(HARNESS), str(tmp_path / "index.html"), str(tmp_path / "scenario.json"))
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def _canned(response: Any) -> dict[str, Any]:
    return {
        "status": response.status_code,
        "body": response.text,
        "content_type": response.headers["content-type"],
    }


@needs_node
async def test_page_streams_a_recipe_and_colours_spans_by_role(
    serve: Any, make_settings: Any, fake_engines: Any, tmp_path: Path, sse_events: Any
) -> None:
    expected_request = {
        "model": "tiny-nudging",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 24,
        "temperature": 0,
        "alignment": {"trace": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France? ½ é"},
        ],
    }
    auth = {"Authorization": "Bearer sk-page"}
    async with serve(make_settings(recipes=RECIPES, server={"api_keys": ["sk-page"]}), fake_engines()) as h:
        page = (await h.client.get("/")).text
        models = await h.client.get("/v1/models", headers=auth)
        stream = await h.client.post("/v1/chat/completions", json=expected_request, headers=auth)
        whole = await h.client.post(
            "/v1/chat/completions", json={**expected_request, "stream": False}, headers=auth
        )
    report = await _run_page(
        tmp_path,
        page,
        {
            "responses": {"/v1/models": _canned(models), "/v1/chat/completions": _canned(stream)},
            "api_key": "sk-page",
            "select": "tiny-nudging",
            "mode": "chat",
            "system": "Be brief.",
            "prompt": "What is the capital of France? ½ é",
            "max_tokens": 24,
            "temperature": 0,
            "chunk_bytes": 7,  # events and UTF-8 characters split across reads
        },
    )
    assert report["error_after_load"] is None and report["error"] is None, report
    kinds = [c["kind"] for c in report["cards"]]
    assert kinds == ["recipe", "recipe", "model", "model", "model"]
    nudging_card = next(c for c in report["cards"] if c["id"] == "tiny-nudging")
    assert "decoder: nudging" in nudging_card["text"] and "aligner → tiny-chat" in nudging_card["text"]

    sent = [r for r in report["requests"] if r["method"] == "POST"]
    assert len(sent) == 1 and sent[0]["path"] == "/v1/chat/completions"
    assert sent[0]["body"] == expected_request
    assert sent[0]["headers"]["Authorization"] == "Bearer sk-page"
    assert all(r["headers"].get("Authorization") == "Bearer sk-page" for r in report["requests"])

    choice = whole.json()["choices"][0]
    trace_spans = [
        s
        for e in sse_events(stream.text)[:-1]
        for c in e["choices"]
        for s in c.get("alignment_trace", {}).get("spans", [])
    ]
    assert trace_spans == choice["alignment_trace"]["spans"]
    assert [(s["role"], s["text"]) for s in report["spans"]] == [(s["role"], s["text"]) for s in trace_spans]
    assert report["output_text"] == choice["message"]["content"]
    counts = choice["alignment_trace"]["role_token_counts"]
    assert sorted(report["legend_roles"]) == sorted(counts) and len(counts) == 2
    total = sum(counts.values())
    for role, count in counts.items():
        model = NUDGING["roles"][role]
        assert (
            f"{role} ({model}): {count} token{'s' if count != 1 else ''}, {100 * count / total:.1f}%"
            in report["legend"]
        )
    last = trace_spans[-1]
    assert report["tooltip_display"] == "block"
    assert f"role: {last['role']}" in report["tooltip"] and last["reason"] in report["tooltip"]
    assert "token ids: " + ", ".join(map(str, last["token_ids"])) in report["tooltip"]
    assert "finish_reason: " + choice["finish_reason"] in report["status"]
    assert not report["send_disabled"]


@needs_node
async def test_page_streams_a_plain_model_as_one_role(
    serve: Any, make_settings: Any, fake_engines: Any, tmp_path: Path, sse_events: Any
) -> None:
    body = {
        "model": "tiny-base",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 9,
        "temperature": 0.5,
        "prompt": "Once upon a time",
    }
    async with serve(make_settings(recipes=RECIPES), fake_engines()) as h:
        page = (await h.client.get("/")).text
        models = await h.client.get("/v1/models")
        stream = await h.client.post("/v1/completions", json={**body, "ignore_eos": True})
    report = await _run_page(
        tmp_path,
        page,
        {
            "responses": {"/v1/models": _canned(models), "/v1/completions": _canned(stream)},
            "select": "tiny-base",
            "prompt": "Once upon a time",
            "max_tokens": 9,
            "temperature": 0.5,
            "chunk_bytes": 13,
        },
    )
    assert report["mode_after_select"] == "completion", "a base model switches the page to completions"
    assert report["requests"][-1]["body"] == body
    text = "".join(c["choices"][0]["text"] for c in sse_events(stream.text)[:-1] if c["choices"])
    assert report["output_text"] == text and text
    assert {s["role"] for s in report["spans"]} == {"tiny-base"}
    assert "tiny-base: 9 tokens, 100.0%" in report["legend"]


@needs_node
async def test_page_shows_openai_errors(
    serve: Any, make_settings: Any, fake_engines: Any, tmp_path: Path
) -> None:
    async with serve(make_settings(recipes=RECIPES, server={"api_keys": ["sk-page"]}), fake_engines()) as h:
        page = (await h.client.get("/")).text
        unauthorized = await h.client.get("/v1/models")
        auth = {"Authorization": "Bearer sk-page"}
        models = await h.client.get("/v1/models", headers=auth)
        too_long = await h.client.post(
            "/v1/completions",
            headers=auth,
            json={
                "model": "tiny-contrastive",
                "prompt": "hi",
                "max_tokens": 5000,
                "alignment": {"trace": True},
            },
        )
    locked = await _run_page(
        tmp_path, page, {"responses": {"/v1/models": _canned(unauthorized)}, "prompt": "x"}
    )
    assert locked["error_after_load"].startswith("401 authentication_error (invalid_api_key): Missing bearer")
    assert "Set the API key" in locked["error_after_load"]

    refused = await _run_page(
        tmp_path,
        page,
        {
            "responses": {"/v1/models": _canned(models), "/v1/completions": _canned(too_long)},
            "api_key": "sk-page",
            "select": "tiny-contrastive",
            "mode": "completion",
            "prompt": "hi",
            "max_tokens": 5000,
        },
    )
    assert refused["error"].startswith("400 invalid_request_error (context_length_exceeded): ")
    assert "param: max_tokens" in refused["error"]
    assert refused["spans"] == []

    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "tiny-contrastive",
        "choices": [
            {
                "index": 0,
                "text": "Hi",
                "logprobs": None,
                "finish_reason": None,
                "alignment_trace": {
                    "spans": [{"text": "Hi", "token_ids": [5], "role": "expert", "reason": "kept"}]
                },
            }
        ],
    }
    error = {"error": {"message": "engine died: boom", "type": "server_error", "param": None, "code": 503}}
    broken = "".join(f"data: {json.dumps(x)}\n\n" for x in (chunk, error)) + "data: [DONE]\n\n"
    mid_stream = await _run_page(
        tmp_path,
        page,
        {
            "responses": {
                "/v1/models": _canned(models),
                "/v1/completions": {"status": 200, "body": broken, "content_type": "text/event-stream"},
            },
            "api_key": "sk-page",
            "select": "tiny-contrastive",
            "mode": "completion",
            "prompt": "hi",
        },
    )
    assert mid_stream["error"] == "server_error (503): engine died: boom"
    assert [(s["role"], s["text"]) for s in mid_stream["spans"]] == [("expert", "Hi")]
    assert "expert (tiny-base): 1 token, 100.0%" in mid_stream["legend"]

"""The titled examples of docs/sdk.md run against a canned HTTP server (the real-server run is in
tests/integration/test_sdk_examples.py); this catches examples that drift from the SDK's API."""

from __future__ import annotations

import json
import re
import shlex
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alignd.client import cli

DOC = Path(__file__).resolve().parents[3] / "docs" / "sdk.md"
BLOCK = re.compile(r'^```(python|console) title="([^"]+)"\n(.*?)^```', re.MULTILINE | re.DOTALL)
DOC_BASE_URL = "http://127.0.0.1:8000"
MODELS = ["gemma-3-270m", "smollm2-135m-instruct"]
DECODERS = ["nudging", "contrastive", "urial", "grammar", "args", "logit_arithmetic"]


def examples(kind: str) -> list[tuple[str, str]]:
    return [(title, body) for k, title, body in BLOCK.findall(DOC.read_text()) if k == kind]


def _error(status: int, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }


class CannedAPI(BaseHTTPRequestHandler):
    """Answers like alignd would, with the text "yes" for every generation."""

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok", "models": MODELS})
        elif self.path == "/v1/models":
            cards = [
                {"id": m, "object": "model", "alignd": {"kind": "model", "base_model": m == MODELS[0]}}
                for m in MODELS
            ]
            cards.append(
                {
                    "id": "nudged",
                    "object": "model",
                    "alignd": {
                        "kind": "recipe",
                        "decoder": "nudging",
                        "roles": {"base": {"model": MODELS[0]}, "aligner": {"model": MODELS[1]}},
                    },
                }
            )
            self._send(200, {"object": "list", "data": cards})
        elif self.path == "/v1/alignment/decoders":
            data = [
                {
                    "name": d,
                    "description": f"the {d} decoder",
                    "shared_vocab": d != "nudging",
                    "roles": [
                        {"name": "base", "description": "writes", "task": "generate", "optional": False}
                    ],
                    "params_schema": {"properties": {"gamma": {"default": 0.4}}},
                }
                for d in DECODERS
            ]
            self._send(200, {"object": "list", "data": data})
        else:
            self._send(*_error(404, "no such route", None))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        alignment = body.get("alignment") or {}
        chat = self.path == "/v1/chat/completions"
        if body["model"] not in [*MODELS, "nudged"]:
            return self._send(*_error(404, f"The model `{body['model']}` does not exist.", "model"))
        if alignment.get("decoder") and alignment["decoder"] not in DECODERS:
            return self._send(*_error(400, f"unknown decoder {alignment['decoder']!r}", "alignment.decoder"))
        spans = [
            {"text": "y", "token_ids": [1], "role": "base", "reason": "top-1"},
            {"text": "es", "token_ids": [2], "role": "aligner", "reason": "nudged"},
        ]
        trace = alignment.get("trace")
        if body.get("stream"):
            chunks = []
            for s in spans:
                choice: dict[str, Any] = {"index": 0, "finish_reason": None}
                choice.update({"delta": {"content": s["text"]}} if chat else {"text": s["text"]})
                if trace:
                    choice["alignment_trace"] = {"spans": [s]}
                chunks.append(
                    {"id": "1", "object": "chunk", "created": 1, "model": body["model"], "choices": [choice]}
                )
            chunks[-1]["choices"][0]["finish_reason"] = "stop"
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return self._send(200, sse.encode(), "text/event-stream")
        choice = {"index": 0, "finish_reason": "stop"}
        choice.update({"message": {"role": "assistant", "content": "yes"}} if chat else {"text": "yes"})
        if trace:
            choice["alignment_trace"] = {"spans": spans, "role_token_share": {"base": 0.5, "aligner": 0.5}}
        self._send(
            200,
            {
                "id": "1",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            },
        )
        return None


@pytest.fixture(scope="module")
def canned_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_doc_has_titled_examples() -> None:
    titles = [t for t, _ in examples("python")]
    assert {"quickstart.py", "streaming.py", "errors.py", "openai_client.py", "async_client.py"} <= set(
        titles
    )
    assert examples("console")


@pytest.mark.parametrize(("title", "code"), examples("python"), ids=[t for t, _ in examples("python")])
def test_python_example_runs(
    title: str,
    code: str,
    canned_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "from openai import" in code:
        pytest.importorskip("openai")
    monkeypatch.setenv("ALIGND_BASE_URL", canned_url)
    exec(compile(code.replace(DOC_BASE_URL, canned_url), title, "exec"), {"__name__": "__main__"})  # noqa: S102 (the doc's own examples)
    assert capsys.readouterr().out or title.startswith("testing_")


def test_cli_examples_run(
    canned_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import sys

    monkeypatch.setenv("ALIGND_BASE_URL", canned_url)
    for _, block in examples("console"):
        for line in block.splitlines():
            command = line.removeprefix("$ ").strip()
            stdin = ""
            if "|" in command:  # echo TEXT | alignd ...
                feed, command = (part.strip() for part in command.split("|", 1))
                stdin = shlex.split(feed)[1] + "\n"
            argv = shlex.split(command)
            assert argv[0] == "alignd", line
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
            assert cli.main(argv[1:]) == 0, f"{line}\n{capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert "nudged" in out and "yes" in out

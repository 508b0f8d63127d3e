"""The real embedded default models (prepared by `alignd models prepare`) behind the real server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from alignd.server.settings import default_config_path
from tests.integration.conftest import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.engine, pytest.mark.embedded]


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The packaged default configuration, exactly as `make serve` runs it."""
    config = yaml.safe_load(Path(default_config_path()).read_text())
    server = start_server(config, tmp_path_factory.mktemp("embedded"))
    yield server
    # uvicorn re-raises the signal it handled after a graceful shutdown: -SIGTERM is a clean exit.
    assert stop_server(server) in (0, -signal.SIGTERM), server.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(embedded_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded_server.api_url, api_key="unused", max_retries=0, timeout=300)


def test_gemma_completes(client: openai.OpenAI) -> None:
    out = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=12,
                                    temperature=0)
    assert "Paris" in out.choices[0].text or "France" in out.choices[0].text, out.choices[0].text


def test_smollm2_chats(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0, stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text, text


def test_default_recipes_are_listed(client: openai.OpenAI) -> None:
    cards = {m.id: m.model_extra["alignd"] for m in client.models.list().data}
    assert cards["gemma-3-270m"]["base_model"] is True
    assert cards["smollm2-135m-instruct"]["base_model"] is False
    assert cards["nudging"]["kind"] == "recipe"


def test_nudging_across_tokenizers(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="nudging", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=40,
        temperature=0, extra_body={"alignment": {"trace": True}},
    )
    trace = out.choices[0].model_extra["alignment_trace"]
    assert out.choices[0].message.content
    assert "".join(s["text"] for s in trace["spans"]) == out.choices[0].message.content
    assert set(trace["role_token_share"]) <= {"base", "aligner"}


def test_speculative_contrastive_on_a_large_vocabulary(client: openai.OpenAI) -> None:
    """On SmolLM2's 49k vocabulary contrastive reads top-k views, so verifying a drafted block can ask the
    amateur again at several positions in one batch (its refinements): the request succeeds and keeps
    drafted tokens. (bf16 numerics differ between drafted and stepwise runs, so the text is not compared
    here; the tiny fp32 tests compare tokens.)"""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    spec = {"alignment": {"trace": True, "params": {"speculative": {"draft_role": "expert", "block_size": 8}}}}
    out = client.chat.completions.create(model="contrastive-prompt", messages=messages, max_tokens=32,
                                         temperature=0, extra_body=spec)
    trace = out.choices[0].model_extra["alignment_trace"]
    assert out.choices[0].message.content
    assert any("drafted by expert" in span.get("reason", "") for span in trace["spans"]), trace["spans"][:3]


def _python_blocks(path: Path) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("doc", ["README.md", "docs/decoders.md"])
def test_documented_examples_run_as_written(embedded_server: RunningServer, doc: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    blocks = _python_blocks(root / doc)
    assert blocks, f"{doc} has python examples"
    for block in blocks:
        code = block.replace("http://127.0.0.1:8000", embedded_server.base_url)
        exec(compile(code, f"{doc} example", "exec"), {"__name__": "__doc_example__"})  # noqa: S102
    assert capsys.readouterr().out.strip(), "the examples print their answers"

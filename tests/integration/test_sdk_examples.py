"""The titled examples of docs/sdk.md, run against the real server: the Python blocks in-process, the
console block through the installed ``alignd`` command.

The doc is written for the embedded default models; the test server hosts tiny generated models, so the
default names (and URL) are replaced by the fixture's before running.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
BLOCK = re.compile(r'^```(python|console) title="([^"]+)"\n(.*?)^```', re.MULTILINE | re.DOTALL)
DOC_BASE_URL = "http://127.0.0.1:8000"
# doc model name -> the fixture's part that plays it
DOC_MODELS = {"gemma-3-270m": "base", "smollm2-135m-instruct": "chat"}


def examples(kind: str) -> list[tuple[str, str]]:
    return [(title, body) for k, title, body in BLOCK.findall(DOC.read_text()) if k == kind]


def for_server(text: str, server: Any) -> str:
    """The doc's text with the test server's URL and model names."""
    text = text.replace(DOC_BASE_URL, server.base_url)
    for doc_name, part in DOC_MODELS.items():
        text = text.replace(doc_name, server.models[part])
    return text


@pytest.mark.parametrize(("title", "code"), examples("python"), ids=[t for t, _ in examples("python")])
def test_python_example(
    title: str,
    code: str,
    alignd_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "from openai import" in code:
        pytest.importorskip("openai")
    monkeypatch.setenv("ALIGND_BASE_URL", alignd_server.base_url)
    monkeypatch.delenv("ALIGND_API_KEY", raising=False)
    exec(compile(for_server(code, alignd_server), title, "exec"), {"__name__": "__main__"})  # noqa: S102 (the doc's own examples)
    assert capsys.readouterr().out or title.startswith("testing_")


@pytest.mark.parametrize(("title", "block"), examples("console"), ids=[t for t, _ in examples("console")])
def test_console_example(title: str, block: str, alignd_server: Any) -> None:
    bin_dir = str(Path(sys.executable).parent)  # the venv's `alignd`
    env = {
        **os.environ,
        "ALIGND_BASE_URL": alignd_server.base_url,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
    }
    env.pop("ALIGND_API_KEY", None)
    for line in for_server(block, alignd_server).splitlines():
        command = line.removeprefix("$ ").strip()
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300, check=False
        )
        assert done.returncode == 0, f"{command}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        assert done.stdout.strip(), command


def test_cli_lists_the_servers_models(alignd_server: Any) -> None:
    alignd = Path(sys.executable).parent / "alignd"
    out = subprocess.run(
        [str(alignd), "models", "list", "--base-url", alignd_server.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for model in alignd_server.models.values():
        assert model in out.stdout

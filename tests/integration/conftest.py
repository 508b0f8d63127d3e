"""The integration tier: the real alignd server, with real vLLM engines, on tiny generated models.

One server process starts per test session (``alignd_server``); tests drive it with the official
``openai`` client, as users do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.tiny_models import REPO_ROOT, ensure_tiny_models

STARTUP_TIMEOUT_S = 600


@dataclass
class RunningServer:
    """A started alignd server: its URL, the plain model names by part, recipe names, config and log."""

    base_url: str
    models: dict[str, str]
    recipes: list[str]
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.base_url + "/v1"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_config(paths: dict[str, Path]) -> dict[str, object]:
    """The test server's configuration: the tiny models in float32 and one recipe per decoder."""
    common = {"dtype": "float32", "max_model_len": 4096}
    models = {name: {"path": str(path), **common} for name, path in paths.items()}
    models["tiny-reward"]["task"] = "reward"
    # vLLM's own speculative decoding (n-gram drafts), configured per hosted model through `vllm:`.
    models["tiny-base-ngram"] = {
        "path": str(paths["tiny-base"]), **common,
        "vllm": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1}},
    }
    recipes: dict[str, object] = {
        "tiny-contrastive": {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"}},
        "tiny-contrastive-spec": {
            "decoder": "contrastive",
            "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"},
            "params": {"speculative": {"draft_role": "expert", "block_size": 4}},
        },
        "tiny-logit-arithmetic": {
            "decoder": "logit_arithmetic",
            "roles": {"base": "tiny-base", "aligned": "tiny-chat", "reference": "tiny-amateur"},
            "params": {"lambda": 1.5},
        },
        "tiny-args-implicit": {
            "decoder": "args",
            "roles": {"base": "tiny-base", "aligned": "tiny-chat", "reference": "tiny-amateur"},
            "params": {"k": 5, "w": 1.0, "rewards": [{"kind": "implicit"}]},
        },
        "tiny-args-rm": {
            "decoder": "args",
            "roles": {"base": "tiny-base", "reward": "tiny-reward"},
            "params": {"k": 4, "w": 1.0, "rewards": [{"kind": "model"}]},
        },
        "tiny-nudging": {"decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"}},
        "tiny-grammar": {
            "decoder": "grammar",
            "roles": {"base": "tiny-base"},
            "params": {"mode": "asap", "regex": "(yes|no|maybe)"},
        },
        "tiny-urial": {"decoder": "urial", "roles": {"base": "tiny-base"}},
    }
    # Tiny models need little KV cache; several engines share the test machine's memory.
    return {"models": models, "recipes": recipes, "kv_cache_gib": 0.25}


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Poll /health until 200; fail with the server's log tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"alignd exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"alignd did not become healthy in {timeout}s:\n{log_path.read_text()[-4000:]}")


def start_server(config: dict[str, object], workdir: Path, extra_args: list[str] | None = None) -> RunningServer:
    """Start ``alignd serve`` in a subprocess with ``config`` and wait until it is healthy."""
    config_path = workdir / "alignd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "server.log"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(config_path),
           "--port", str(port), "--log-level", "warning", *(extra_args or [])]
    with open(log_path, "wb") as log:
        # Its own process group, so a kill on failure takes the engine processes with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, proc, log_path, STARTUP_TIMEOUT_S)
    except BaseException:
        _kill_group(proc)
        raise
    models = {"base": "tiny-base", "chat": "tiny-chat", "amateur": "tiny-amateur", "reward": "tiny-reward"}
    return RunningServer(base_url, models, list(config.get("recipes") or {}), config_path, log_path, proc)


def stop_server(server: RunningServer) -> int:
    """SIGTERM the server and wait for a clean exit; returns its exit code."""
    server.process.terminate()
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_group(server.process)
        return -9


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def tiny_paths() -> dict[str, Path]:
    """The tiny generated models."""
    return ensure_tiny_models()


@pytest.fixture(scope="session")
def alignd_server(tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real alignd server for the whole test session."""
    workdir = tmp_path_factory.mktemp("alignd-server")
    server = start_server(tiny_config(tiny_paths), workdir)
    server.paths = tiny_paths
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def openai_client(alignd_server: RunningServer):  # type: ignore[no-untyped-def]
    """The official openai client pointed at alignd, without retries (errors must surface)."""
    import openai

    return openai.OpenAI(base_url=alignd_server.api_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def async_openai_client(alignd_server: RunningServer):  # type: ignore[no-untyped-def]
    """The official async openai client pointed at alignd."""
    import openai

    return openai.AsyncOpenAI(base_url=alignd_server.api_url, api_key="unused", max_retries=0, timeout=300)

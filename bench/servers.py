"""Start and stop the servers a benchmark talks to: ``alignd serve`` and vLLM's own OpenAI server.

Each runs in its own subprocess on a free loopback port, with its log in the benchmark's work folder;
:func:`start_alignd` and :func:`start_vllm` return once ``/health`` answers 200 and record how long that took.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

__all__ = ["REPO_ROOT", "Server", "free_port", "start_alignd", "start_vllm", "stop"]

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 900


@dataclass
class Server:
    """A started server: its process, URL, log and time from launch to a healthy ``/health``."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    startup_s: float

    @property
    def api_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int:
        """The server's root process id."""
        return self.process.pid


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(vllm_server: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if vllm_server:
        # alignd gives each in-process model 1 GiB of KV cache on CPU; vLLM's own server the same
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def _wait_healthy(name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path, t0: float) -> float:
    deadline = t0 + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{name} was not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def start_alignd(
    config: dict[str, object], workdir: Path, name: str, *, prepare: bool = False,
    on_launch: Callable[[int], None] | None = None,
) -> Server:
    """``alignd serve --config`` on a free port; with ``prepare``, ``alignd models prepare`` runs first and
    the start-up time covers both, as ``make serve`` does on a prepared machine. ``on_launch`` gets the
    server's pid as soon as it exists (to sample its memory from the start)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / f"{name}.log"
    t0 = time.monotonic()
    if prepare:
        subprocess.run([_bin("alignd"), "models", "prepare", "--quiet"], check=True, cwd=REPO_ROOT,
                       stdout=subprocess.DEVNULL, env=_env())
    cmd = [_bin("alignd"), "serve", "--config", str(config_path), "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env())
    if on_launch is not None:
        on_launch(proc.pid)
    url = f"http://127.0.0.1:{port}"
    return Server(name, proc, url, log_path, _wait_healthy(name, proc, url, log_path, t0))


def start_vllm(model_path: str, served_name: str, workdir: Path, *, dtype: str, max_model_len: int) -> Server:
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` command of
    the CPU build cannot find its own metadata) with the engine arguments alignd uses for a local model."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"vllm-{served_name}.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--enable-prefix-caching", "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]
    from alignd.server.engines.vllm_local import on_cpu

    if on_cpu():
        cmd.append("--enforce-eager")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env(True))
    url = f"http://127.0.0.1:{port}"
    return Server(f"vllm:{served_name}", proc, url, log_path, _wait_healthy(served_name, proc, url, log_path, t0))


def stop(server: Server) -> int:
    """SIGTERM the server, wait for it (SIGKILL after a minute); returns its exit code."""
    import psutil

    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = server.process.wait()
    # engine processes the server started and left behind (they are ours: kill them by pid)
    _, alive = psutil.wait_procs(children, timeout=20)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return code

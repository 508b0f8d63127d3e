"""Remote engines: the no-container deployment topology, on loopback.

Two real vLLM OpenAI servers (``python -m vllm.entrypoints.openai.api_server``, the CPU build's working
entry point) serve tiny-base and tiny-chat; an alignd gateway reaches them as ``engine: remote`` models
and hosts tiny-amateur in-process, with a nudging recipe across the two servers and a contrastive recipe
mixing a remote and a local model. tiny-chat is reached through a TCP gate the tests can cut, to see a
remote go down and come back. Outputs are compared, greedy and float32, with the vLLM servers asked
directly and with the session's all-local gateway (``alignd_server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import RunningServer, free_port, start_server, stop_server
from tests.support.tiny_models import REPO_ROOT

pytestmark = pytest.mark.engine

VLLM_STARTUP_S = 420
KV_CACHE = "256M"  # a tiny model needs 8 MiB per 4096-token sequence
PROMPT = "The capital of France is"
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Paris."}]


# ---- vLLM servers and a cuttable gate in front of one -------------------------------------------------


@dataclass
class VLLMServer:
    """A ``vllm serve`` subprocess (its own process group, so its engine processes stop with it)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"


def start_vllm(name: str, path: Path, workdir: Path) -> VLLMServer:
    """Launch the vLLM OpenAI server for one tiny model (float32, eager, full-vocabulary logprobs, a small
    KV cache)."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "4096", "--max-logprobs", "-1", "--disable-log-stats",
        "--disable-uvicorn-access-log", "--kv-cache-memory-bytes", KV_CACHE,
    ]
    # The legacy VLLM_CPU_KVCACHE_SPACE (whole GiB) would override the smaller explicit size.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)
    return VLLMServer(name, port, proc, log_path)


def wait_vllm(server: VLLMServer, deadline: float) -> None:
    """Poll the server's /health until 200; fail with its log tail if it exits or the deadline passes."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"vLLM for {server.name} exited:\n{server.log_path.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM for {server.name} did not start:\n{server.log_path.read_text()[-4000:]}")


def stop_vllm(servers: list[VLLMServer]) -> None:
    """SIGTERM the servers' process groups (engine processes included), SIGKILL what lingers."""
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for server in servers:
        try:
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # The group may outlive its leader (engine core, worker): end it whole.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=10)


class TcpGate:
    """A loopback TCP forwarder in its own thread: :meth:`cut` refuses and drops connections, as a dead
    server would; :meth:`restore` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()
        self.restore()

    @property
    def url(self) -> str:
        """The gate's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= pair

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        """Accept and forward connections."""
        self._run(self._open())

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        self._run(self._cut())

    def close(self) -> None:
        """Cut and stop the thread."""
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# ---- the topology --------------------------------------------------------------------------------------


@dataclass
class Topology:
    """The remote gateway, the vLLM servers behind it, the gate in front of tiny-chat, the local gateway."""

    gateway: RunningServer
    vllm: dict[str, VLLMServer]
    gate: TcpGate
    local: RunningServer

    def client(self, server: RunningServer | VLLMServer) -> openai.OpenAI:
        """The official openai client for one of the servers, without retries."""
        base = server.url + "/v1" if isinstance(server, VLLMServer) else server.api_url
        return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def remote_config(paths: dict[str, Path], urls: dict[str, str]) -> dict[str, object]:
    """tiny-base and tiny-chat remote, tiny-amateur in-process; nudging across remotes, mixed contrastive."""
    client_options = {"health_interval": 1.0, "start_timeout": 120, "retries": 2, "backoff": 0.1}
    models: dict[str, object] = {
        name: {"path": str(paths[name]), "engine": "remote", "url": urls[name] + "/v1", "served_name": name,
               "max_model_len": 4096, "vllm": client_options}
        for name in ("tiny-base", "tiny-chat")
    }
    models["tiny-amateur"] = {"path": str(paths["tiny-amateur"]), "dtype": "float32", "max_model_len": 4096}
    recipes = {
        "remote-nudging": {"decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"}},
        "mixed-contrastive": {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"}},
    }
    return {"models": models, "recipes": recipes, "kv_cache_gib": 0.25}


@pytest.fixture(scope="module")
def topology(
    request: pytest.FixtureRequest, tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    """Start both vLLM servers, then (while they load) the local gateway, then the remote gateway."""
    workdir = tmp_path_factory.mktemp("remote")
    servers: dict[str, VLLMServer] = {}
    gate: TcpGate | None = None
    gateway: RunningServer | None = None
    try:
        for name in ("tiny-base", "tiny-chat"):
            servers[name] = start_vllm(name, tiny_paths[name], workdir)
        local: RunningServer = request.getfixturevalue("alignd_server")
        deadline = time.monotonic() + VLLM_STARTUP_S
        for server in servers.values():
            wait_vllm(server, deadline)
        gate = TcpGate(servers["tiny-chat"].port)
        urls = {"tiny-base": servers["tiny-base"].url, "tiny-chat": gate.url}
        gateway = start_server(remote_config(tiny_paths, urls), workdir)
        yield Topology(gateway, servers, gate, local)
    finally:
        if gateway is not None:
            stop_server(gateway)
        if gate is not None:
            gate.close()
        stop_vllm(list(servers.values()))


# ---- tests -------------------------------------------------------------------------------------------------


def test_remote_models_are_listed_ready(topology: Topology) -> None:
    cards: dict[str, Any] = {m.id: m.model_extra for m in topology.client(topology.gateway).models.list().data}
    for name in ("tiny-base", "tiny-chat"):
        assert cards[name]["alignd"]["engine"] == "remote" and cards[name]["alignd"]["ready"] is True
        assert cards[name]["max_model_len"] == 4096
    assert cards["tiny-amateur"]["alignd"]["engine"] == "local"
    assert cards["tiny-chat"]["alignd"]["base_model"] is False


def test_completion_matches_vllm_and_the_local_engine(topology: Topology) -> None:
    kwargs: dict[str, Any] = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                              "logprobs": 2}
    remote = topology.client(topology.gateway).completions.create(**kwargs)
    direct = topology.client(topology.vllm["tiny-base"]).completions.create(**kwargs)
    local = topology.client(topology.local).completions.create(**kwargs)
    assert remote.choices[0].text == direct.choices[0].text == local.choices[0].text
    assert remote.usage.completion_tokens == local.usage.completion_tokens
    assert remote.choices[0].logprobs.token_logprobs == pytest.approx(local.choices[0].logprobs.token_logprobs,
                                                                      abs=1e-4)
    assert remote.choices[0].logprobs.tokens == local.choices[0].logprobs.tokens


def test_chat_and_stream_match(topology: Topology) -> None:
    kwargs: dict[str, Any] = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    remote = topology.client(topology.gateway).chat.completions.create(**kwargs)
    direct = topology.client(topology.vllm["tiny-chat"]).chat.completions.create(**kwargs)
    local = topology.client(topology.local).chat.completions.create(**kwargs)
    assert remote.choices[0].message.content == direct.choices[0].message.content
    assert remote.choices[0].message.content == local.choices[0].message.content
    assert remote.usage.prompt_tokens == direct.usage.prompt_tokens
    chunks = list(topology.client(topology.gateway).chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == remote.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == remote.usage.completion_tokens


def test_sampling_with_seed_and_n_matches_vllm(topology: Topology) -> None:
    kwargs: dict[str, Any] = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
                              "seed": 7, "n": 2}
    remote = topology.client(topology.gateway).completions.create(**kwargs)
    direct = topology.client(topology.vllm["tiny-base"]).completions.create(**kwargs)
    assert sorted(c.text for c in remote.choices) == sorted(c.text for c in direct.choices)


def test_a_request_the_remote_refuses_is_a_400(topology: Topology) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        topology.client(topology.gateway).completions.create(model="tiny-base", prompt=PROMPT, max_tokens=4,
                                                             temperature=0, n=2)
    assert "greedy" in info.value.message


def test_nudging_across_two_remote_servers_equals_local(topology: Topology) -> None:
    kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": "Tell me about Paris."}], "max_tokens": 24,
                              "temperature": 0, "extra_body": {"alignment": {"trace": True}}}
    remote = topology.client(topology.gateway).chat.completions.create(model="remote-nudging", **kwargs)
    local = topology.client(topology.local).chat.completions.create(model="tiny-nudging", **kwargs)
    trace = remote.choices[0].model_extra["alignment_trace"]
    assert remote.choices[0].message.content == local.choices[0].message.content
    assert "".join(s["text"] for s in trace["spans"]) == remote.choices[0].message.content
    assert set(trace["role_token_share"]) <= {"base", "aligner"}
    assert sum(trace["role_token_share"].values()) == pytest.approx(1.0)
    local_trace = local.choices[0].model_extra["alignment_trace"]
    assert [(s["role"], s["text"]) for s in trace["spans"]] == [(s["role"], s["text"]) for s in local_trace["spans"]]
    assert trace["role_token_counts"] == local_trace["role_token_counts"]


def test_a_recipe_mixing_remote_and_local_equals_local(topology: Topology) -> None:
    kwargs: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    remote = topology.client(topology.gateway).completions.create(model="mixed-contrastive", **kwargs)
    local = topology.client(topology.local).completions.create(model="tiny-contrastive", **kwargs)
    assert remote.choices[0].text == local.choices[0].text
    assert remote.usage.completion_tokens == local.usage.completion_tokens


def test_a_remote_that_goes_down_gives_503_and_comes_back(topology: Topology) -> None:
    client = topology.client(topology.gateway)
    health = topology.gateway.base_url + "/health"
    topology.gate.cut()
    try:
        for call in (
            lambda: client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4),
            lambda: list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4,
                                                        stream=True)),
            lambda: client.chat.completions.create(model="remote-nudging", messages=MESSAGES, max_tokens=4),
        ):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                call()
            assert info.value.status_code == 503, info.value.message
            assert time.monotonic() - started < 15
        down = httpx.get(health, timeout=15)
        assert down.status_code == 503 and "tiny-chat" in down.json()["error"]["message"]
        # the other remote keeps serving
        ok = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=2, temperature=0)
        assert ok.choices[0].finish_reason == "length"
    finally:
        topology.gate.restore()
    deadline = time.monotonic() + 20
    while httpx.get(health, timeout=15).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not see tiny-chat come back"
        time.sleep(0.5)
    again = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4, temperature=0)
    assert again.choices[0].message.content is not None

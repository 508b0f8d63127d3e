"""Start-up and shutdown of the real server, and native decoding equal to vLLM's own offline engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import RunningServer, start_server

pytestmark = pytest.mark.engine

_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    path, prompt_ids = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512)
    out = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    print("RESULT", json.dumps(list(out[0].outputs[0].token_ids)))
"""


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    kids = {int(x) for x in out.stdout.split()}
    for kid in list(kids):
        kids |= _children(kid)
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_greedy_equals_vllm_offline(alignd_server: RunningServer, openai_client: openai.OpenAI,
                                    tmp_path: Path) -> None:
    prompt = "Once upon a time there was"
    ids = httpx.post(alignd_server.base_url + "/tokenize", json={"model": "tiny-base", "prompt": prompt}).json()["tokens"]
    script = tmp_path / "offline.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([sys.executable, str(script), str(alignd_server.paths["tiny-base"]), json.dumps(ids)],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, run.stderr[-3000:]
    expected = json.loads(line[0][7:])
    out = openai_client.completions.create(
        model="tiny-base", prompt=ids, max_tokens=16, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    served = [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]
    assert served == expected


def test_sigint_shuts_down_cleanly(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    # SIGTERM is exercised by every other server's teardown (see test_embedded.py).
    sig = signal.SIGINT
    config = {"models": {"tiny-base": {"path": str(tiny_paths["tiny-base"]), "dtype": "float32",
                                       "max_model_len": 512}}, "kv_cache_gib": 0.25}
    server = start_server(config, tmp_path)
    kids = _children(server.process.pid)
    assert kids, "the engine core runs in a child process"
    started = time.monotonic()
    server.process.send_signal(sig)
    code = server.process.wait(timeout=60)
    assert code in (0, -sig), server.log_path.read_text()[-3000:]
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.5)
    assert not [k for k in kids if _alive(k)], "engine processes outlived the server"


def test_bad_config_fails_before_loading(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    path: /nowhere\n    dtype: float32\n    bogus: 1\n")
    run = subprocess.run([sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert str(bad) in run.stderr and "models.m.bogus" in run.stderr


def test_sigterm_while_loading_leaves_no_engine_behind(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    config = {"models": {name: {"path": str(tiny_paths[name]), "dtype": "float32", "max_model_len": 512}
                         for name in ("tiny-base", "tiny-chat")}, "kv_cache_gib": 0.25}
    config_path = tmp_path / "alignd.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config))
    from tests.integration.conftest import free_port

    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(config_path),
                             "--port", str(free_port())], stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen:
            seen |= _children(proc.pid)
            time.sleep(0.2)
        assert seen, "the first engine started"
        proc.send_signal(signal.SIGTERM)  # the second model has not loaded yet
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _children(proc.pid)
            time.sleep(0.2)
        assert proc.returncode is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(k) for k in seen):
        time.sleep(0.5)
    assert not [k for k in seen if _alive(k)], (tmp_path / "server.log").read_text()[-2000:]

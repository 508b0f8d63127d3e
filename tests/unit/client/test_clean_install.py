"""``pip install ./clients/python`` in a bare venv gives a working SDK and ``alignd`` command, without
torch, vLLM or the server's dependencies. Needs the package index pip is configured with (or its cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[3] / "clients" / "python"

CHECK = """
import importlib.util, alignd.client
assert alignd.client.Client and alignd.client.Nudging
present = [m for m in ("torch", "vllm", "fastapi", "numpy", "alignd.server", "alignd.decoders")
           if importlib.util.find_spec(m) is not None]
print("absent-violations:", present)
print("module:", alignd.client.__file__)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )


def test_sdk_installs_and_runs_in_a_bare_venv(tmp_path: Path) -> None:
    # Build from a copy so the checkout gets no build/ or egg-info litter from the in-tree build.
    src = tmp_path / "src"
    shutil.copytree(
        CLIENT_DIR, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist")
    )
    venv = tmp_path / "venv"
    # No pip inside (seconds saved); the test environment's pip installs into it with --python.
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python, alignd = venv / "bin" / "python", venv / "bin" / "alignd"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg

    installed = _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-compile",
        "--disable-pip-version-check",
        "--quiet",
        src,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    checked = _run(python, "-c", CHECK, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "absent-violations: []" in checked.stdout, checked.stdout
    assert str(venv) in checked.stdout  # imported from the venv, not from this checkout

    helped = _run(alignd, "--help", timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "chat" in helped.stdout and "models" in helped.stdout

    refused = _run(
        alignd, "models", "list", "--base-url", "http://127.0.0.1:9", "--max-retries", "0", timeout=60
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("alignd: error: the alignd server is not running at http://127.0.0.1:9")

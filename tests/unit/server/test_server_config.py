"""Configuration: bad files are rejected naming file, key and reason; CLI > environment > file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignd.server.settings import ConfigError, load_settings
from tests.support.tiny_models import REPO_ROOT


def _write(tmp_path: Path, data: Any, name: str = "alignd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def good_config(tmp_path: Path, tiny_paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "server": {"port": 8001},
        "models": {
            "base": {"path": str(tiny_paths["tiny-base"])},
            "amateur": {"path": str(tiny_paths["tiny-amateur"])},
        },
        "recipes": {"cd": {"decoder": "contrastive", "roles": {"expert": "base", "amateur": "amateur"}}},
    }


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("ALIGND_") and key.upper() != "ALIGND_HOME":
            monkeypatch.delenv(key)


def test_a_good_file_loads(tmp_path: Path, good_config: dict[str, Any]) -> None:
    path = _write(tmp_path, good_config)
    settings = load_settings(path)
    assert settings.config == path
    assert settings.server.port == 8001
    assert settings.recipes["cd"].roles["expert"].model == "base"


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  base: {path: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value) and "invalid YAML" in str(info.value)


def test_a_top_level_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"))


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_unknown_keys_name_file_and_key(tmp_path: Path, good_config: dict[str, Any]) -> None:
    good_config["models"]["base"]["dtyp"] = "float32"
    good_config["server"]["prot"] = 1
    path = _write(tmp_path, good_config)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "models.base.dtyp: Extra inputs are not permitted" in message
    assert "server.prot: Extra inputs are not permitted" in message


def test_bad_values_name_the_key(tmp_path: Path, good_config: dict[str, Any]) -> None:
    good_config["models"]["base"]["task"] = "embed"
    good_config["server"]["port"] = 70000
    message = str(pytest.raises(ConfigError, load_settings, _write(tmp_path, good_config)).value)
    assert "models.base.task" in message and "'generate' or 'reward'" in message
    assert "server.port" in message


def test_a_recipe_naming_an_unknown_model(tmp_path: Path, good_config: dict[str, Any]) -> None:
    good_config["recipes"]["cd"]["roles"]["amateur"] = "nope"
    path = _write(tmp_path, good_config)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "recipes.cd.roles.amateur: unknown model 'nope'" in message


def test_environment_beats_file(
    tmp_path: Path, good_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, good_config)
    monkeypatch.setenv("ALIGND_SERVER__PORT", "9123")
    monkeypatch.setenv("ALIGND_SERVER__MAX_CONCURRENT_REQUESTS", "3")
    from_env = load_settings(path)
    assert from_env.server.port == 9123
    assert from_env.server.max_concurrent_requests == 3
    assert from_env.models["base"].path == good_config["models"]["base"]["path"]

    from_cli = load_settings(path, {"server": {"api_keys": ["sk-cli"]}})
    assert from_cli.server.api_keys == ["sk-cli"]
    assert from_cli.server.port == 9123  # env still beats the file where the CLI says nothing
    assert "cd" in from_cli.recipes

    monkeypatch.setenv("ALIGND_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(path)


def test_cli_beats_environment(
    tmp_path: Path, good_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, good_config)
    monkeypatch.setenv("ALIGND_SERVER__PORT", "9123")
    assert load_settings(path, {"server": {"port": 9999}}).server.port == 9999


def test_alignd_config_names_the_file(
    tmp_path: Path, good_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALIGND_CONFIG", str(_write(tmp_path, good_config)))
    assert load_settings().server.port == 8001


def test_serve_with_a_bad_config_exits_2_before_loading_models(tmp_path: Path) -> None:
    bad = _write(
        tmp_path,
        {
            "models": {"m": {"path": str(tmp_path / "no-such-model")}},
            "recipes": {"r": {"decoder": "contrastive", "roles": {"expert": "m", "amateur": "ghost"}}},
        },
        "bad.yaml",
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ALIGND_") or k == "ALIGND_HOME"}
    proc = subprocess.run(
        [sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(bad), "--port", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("alignd: invalid configuration in " + str(bad))
    assert "recipes.r.roles.amateur: unknown model 'ghost'" in proc.stderr
    assert "starting model" not in proc.stderr and "Uvicorn running" not in proc.stderr
    assert proc.stdout == ""


def test_remote_client_options_are_checked_at_load(tmp_path: Path) -> None:
    from alignd.server.settings import ConfigError, load_settings

    bad = tmp_path / "remote.yaml"
    bad.write_text('models:\n  m: {path: /x, engine: remote, url: "http://h:1/v1", vllm: {tensor_parallel_size: 2}}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert str(bad) in str(info.value) and "models.m" in str(info.value)
    assert "tensor_parallel_size" in str(info.value)

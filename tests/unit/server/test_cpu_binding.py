"""Each in-process model's vLLM worker gets its own CPU cores (``cpu_binding: spread``)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignd.server.engines.cpu_binding import BIND_ENV, omp_bind_value, spread_cores
from alignd.server.engines.vllm_plugin import OMP_BIND_KEY, register_omp_threads_bind
from alignd.server.models import core_shares
from alignd.server.settings import ModelSettings, RecipeSettings, Settings


@pytest.mark.parametrize(
    ("cores", "engines", "expected"),
    [
        ([0, 1], 2, [[0], [1]]),  # this machine: one core each
        ([0, 1], 5, [[0], [1], [0], [1], [0]]),  # more engines than cores: round robin
        ([1, 0, 2], 2, [[0], [1]]),  # one core left for the gateway and the schedulers
        (list(range(16)), 2, [list(range(7)), list(range(7, 14))]),
        ([0, 1, 2, 3], 1, [[0, 1, 2]]),
        ([0], 3, [[0], [0], [0]]),
        ([0, 1], 0, []),
    ],
)
def test_spread_cores(cores: list[int], engines: int, expected: list[list[int]]) -> None:
    assert spread_cores(cores, engines) == expected


def test_engines_stepping_together_take_different_cores_where_they_can() -> None:
    # the test suite's tiny trio on 2 cores: contrastive pairs 0 and 2, logit arithmetic steps all three
    together = [{0, 2}, {0, 2}, {0, 1, 2}, {0, 1}]
    assert spread_cores([0, 1], 3, together) == [[0], [1], [1]]
    assert spread_cores([0, 1], 3, [{0, 2}]) == [[0], [1], [1]]
    assert spread_cores([0, 1], 3, [{1, 2}]) == [[0], [1], [0]]
    # one core: nothing to choose
    assert spread_cores([0], 2, [{0, 1}]) == [[0], [0]]
    # enough cores: the groups change nothing
    assert spread_cores([0, 1, 2], 2, [{0, 1}]) == [[0], [1]]


def test_omp_bind_value() -> None:
    assert omp_bind_value([3, 4, 5]) == "3,4,5"


def test_core_shares_skip_remote_models_and_follow_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("alignd.server.models.allowed_cores", lambda: [0, 1])
    models = {
        "a": ModelSettings(path="/m/a"),
        "far": ModelSettings(path="/m/far", engine="remote", url="http://far:8000"),
        "b": ModelSettings(path="/m/b"),
    }
    assert core_shares(Settings(models=models)) == {"a": [0], "b": [1]}
    assert core_shares(Settings(models=models, cpu_binding="vllm")) == {}


def test_core_shares_keep_a_recipes_models_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("alignd.server.models.allowed_cores", lambda: [0, 1])
    models = {name: ModelSettings(path=f"/m/{name}") for name in ("base", "chat", "amateur")}
    recipes = {"c": RecipeSettings(decoder="contrastive", roles={"expert": "base", "amateur": "amateur"})}
    assert core_shares(Settings(models=models)) == {"base": [0], "chat": [1], "amateur": [0]}
    assert core_shares(Settings(models=models, recipes=recipes)) == {"base": [0], "chat": [1], "amateur": [1]}


def test_a_models_cores_reach_its_engine_core_through_its_config(
    monkeypatch: pytest.MonkeyPatch, tiny_paths: dict[str, Path]
) -> None:
    # the models start side by side, so not through the gateway's environment
    from alignd.server.engines.vllm_local import LocalVLLMEngine, on_cpu

    if not on_cpu():
        pytest.skip("vLLM binds worker threads to cores on its CPU backend only")
    monkeypatch.delenv(BIND_ENV, raising=False)
    settings = ModelSettings(path=str(tiny_paths["tiny-base"]), vllm={"additional_config": {"mine": 1}})
    args = LocalVLLMEngine("tiny-base", settings, 0.1, [1]).engine_args()
    assert args.additional_config == {"mine": 1, OMP_BIND_KEY: "1"}
    assert BIND_ENV not in os.environ
    assert OMP_BIND_KEY not in LocalVLLMEngine("tiny-base", settings, 0.1, None).engine_args().additional_config
    # a binding in the environment is the user's: it stands
    monkeypatch.setenv(BIND_ENV, "0")
    assert OMP_BIND_KEY not in LocalVLLMEngine("tiny-base", settings, 0.1, [1]).engine_args().additional_config


def test_an_engine_core_binds_its_worker_to_the_cores_in_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if not current_platform.is_cpu():
        pytest.skip("vLLM binds worker threads to cores on its CPU backend only")
    register_omp_threads_bind()
    register_omp_threads_bind()  # idempotent
    monkeypatch.setenv(BIND_ENV, "0")  # what the engine core inherited; restored after the test
    parallel = SimpleNamespace(local_world_size=1, data_parallel_rank_local=None, _api_process_count=1)
    config = SimpleNamespace(additional_config={OMP_BIND_KEY: "1"}, parallel_config=parallel, kv_transfer_config=None)
    assert OMPProcessManager(config).cpu_lists == [[1]]
    # an engine without alignd's key keeps what its environment says
    monkeypatch.setenv(BIND_ENV, "0")
    config.additional_config = {}
    assert OMPProcessManager(config).cpu_lists == [[0]]

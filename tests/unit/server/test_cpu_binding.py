"""Each in-process model's vLLM worker gets its own CPU cores (``cpu_binding: spread``)."""

from __future__ import annotations

import pytest

from alignd.server.engines.cpu_binding import omp_bind_value, spread_cores
from alignd.server.models import core_shares
from alignd.server.settings import ModelSettings, Settings


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

"""The speed table: rows with a target, the measured value and pass/fail; printed and written as JSON."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "Row", "machine"]

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One line of the table."""

    what: str
    suite: str
    target: str
    measured: str
    passed: bool | None  # None: reported only, or not measured
    value: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON."""
        value = None if self.value is None or math.isnan(self.value) else round(self.value, 4)
        return {"what": self.what, "suite": self.suite, "target": self.target, "measured": self.measured,
                "pass": self.passed, "value": value, "data": self.data}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import os

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001
        vllm_version = "?"
    try:
        import torch

        gpu = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        gpu = False
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "python": platform.python_version(), "vllm": vllm_version}


class Report:
    """Collects rows as they are measured, then prints and writes them."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.rows: list[Row] = []
        self.extra: dict[str, Any] = {}
        self.started = time.time()

    def add(self, row: Row) -> Row:
        """Add a row (printed at once, so a long run shows progress)."""
        self.rows.append(row)
        mark = {True: "PASS", False: "FAIL", None: "-"}[row.passed]
        print(f"  [{mark}] {row.what} ({row.suite}): {row.measured}  (target {row.target})", flush=True)
        return row

    def ratio(self, what: str, suite: str, value: float, limit: float, *, at_most: bool = True,
              fmt: Callable[[float], str] = lambda v: f"{v:.2f}x", data: dict[str, Any] | None = None) -> Row:
        """A row whose value must stay at or under (``at_most``) or at or over ``limit``."""
        target = f"<= {limit:g}x" if at_most else f">= {limit:g}x"
        ok = None if math.isnan(value) else (value <= limit if at_most else value >= limit)
        return self.add(Row(what, suite, target, fmt(value), ok, value, data or {}))

    def reported(self, what: str, suite: str, measured: str, value: float, data: dict[str, Any]) -> Row:
        """A row reported without a target (an explanation of other rows, such as a measured ceiling)."""
        return self.add(Row(what, suite, "reported", measured, None, value, data))

    def missing(self, what: str, suite: str, target: str, why: str) -> Row:
        """A row that could not be measured in this run."""
        return self.add(Row(what, suite, target, f"not measured: {why}", None))

    def to_json(self) -> dict[str, Any]:
        """The whole report."""
        return {
            "mode": self.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "machine": machine(),
            "rows": [r.to_json() for r in self.rows],
            **self.extra,
        }

    def write(self, latest: bool = True) -> Path:
        """``bench/results/<timestamp>.json`` and (unless ``latest`` is false) ``latest.json``; returns the
        timestamped path."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self.to_json(), indent=2)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        path = RESULTS / f"{stamp}-{self.mode}.json"
        path.write_text(body + "\n")
        if latest:
            (RESULTS / "latest.json").write_text(body + "\n")
        return path

    def print_table(self) -> None:
        """The table with rich when it is installed, plain text otherwise."""
        headers = ["what", "suite", "target", "measured", "result"]
        cells = [[r.what, r.suite, r.target, r.measured, {True: "pass", False: "FAIL", None: "-"}[r.passed]]
                 for r in self.rows]
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
            print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
            for c in cells:
                print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
            return
        table = Table(title=f"alignd speed ({self.mode})")
        for h in headers:
            table.add_column(h, overflow="fold")
        for c, r in zip(cells, self.rows):
            style = {True: "green", False: "red", None: "dim"}[r.passed]
            table.add_row(*c[:-1], f"[{style}]{c[-1]}[/{style}]")
        Console(width=160).print(table)

    def markdown(self) -> str:
        """The table as Markdown (for the README)."""
        lines = ["| what | models | target | measured | result |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            res = {True: "pass", False: "**fail**", None: "-"}[r.passed]
            lines.append(f"| {r.what} | {r.suite} | {r.target} | {r.measured} | {res} |")
        return "\n".join(lines)

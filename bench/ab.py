"""One recipe against itself with some parameters changed, side by side on one server.

``python -m bench.ab --suite embedded --recipe nudging --set aligner_end_lookahead=false`` serves the suite
with a copy of the recipe (``ab-variant``) that has those parameters, then times the two interleaved, in
alternating order: one request at a time over the first prompts, and eight at once. It prints a table
(seconds, variant / recipe) with how often the two wrote the same tokens, and writes
``bench/results/ab-<time>.json``. Use it to measure what an optimisation behind a parameter buys before it
becomes a default.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import load
from bench.configs import INSTRUCTIONS, embedded_suite, tiny_suite
from bench.report import RESULTS, machine
from bench.servers import start_alignd, stop

__all__ = ["main", "measure"]

VARIANT = "ab-variant"


def _setting(text: str) -> tuple[str, Any]:
    """``name=value``, the value read as YAML (``false``, ``2``, ``0.3``, ``"text"``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name, yaml.safe_load(value)


async def measure(suite_name: str, kind: str, settings: dict[str, Any], prompts: int, repeats: int,
                  max_tokens: int) -> dict[str, Any]:
    """Serve the suite with the variant recipe and time both; the JSON result."""
    suite = embedded_suite() if suite_name == "embedded" else tiny_suite()
    config = copy.deepcopy(suite.config)
    name = suite.recipes[kind].name
    recipe = config["recipes"][name]
    config["recipes"][VARIANT] = {**copy.deepcopy(recipe), "params": {**recipe.get("params", {}), **settings}}
    with tempfile.TemporaryDirectory(prefix="alignd-ab-") as workdir:
        return await _interleaved(config, name, suite_name, Path(workdir), settings, prompts, repeats, max_tokens)


async def _interleaved(config: dict[str, Any], name: str, suite_name: str, workdir: Path, settings: dict[str, Any],
                       prompts: int, repeats: int, max_tokens: int) -> dict[str, Any]:
    server = start_alignd(config, workdir, f"ab-{suite_name}")
    try:
        client = load.client(server.api_url)

        async def one(model: str, instruction: str) -> load.Result:
            messages = [{"role": "user", "content": instruction}]
            return await load.chat(client, model, messages, max_tokens, trace=True)

        def order(r: int) -> tuple[str, str]:  # alternating, so neither always runs first
            return (name, VARIANT) if r % 2 == 0 else (VARIANT, name)

        for model in (name, VARIANT):  # start-up costs out of the measurement
            await one(model, "Say hello.")
        single: dict[str, list[float]] = {name: [], VARIANT: []}
        same = asked = 0
        for r in range(repeats):
            for instruction in INSTRUCTIONS[:prompts]:
                ids = {}
                for model in order(r):
                    res = await one(model, instruction)
                    single[model].append(res.seconds)
                    ids[model] = res.token_ids
                same += ids[name] == ids[VARIANT]
                asked += 1
        eight: dict[str, list[float]] = {name: [], VARIANT: []}
        for r in range(repeats):
            for model in order(r):
                jobs = [lambda m=model, i=i: one(m, INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(8)]
                wall, _ = await load.run_all(jobs, len(jobs))
                eight[model].append(wall)
    finally:
        stop(server)
    return {
        "suite": suite_name, "recipe": name, "settings": settings, "max_tokens": max_tokens,
        "prompts": prompts, "repeats": repeats, "machine": machine(),
        "single_seconds": {"recipe": sum(single[name]), "variant": sum(single[VARIANT])},
        "single_ratio": sum(single[VARIANT]) / sum(single[name]),
        "eight_seconds_runs": {"recipe": eight[name], "variant": eight[VARIANT]},
        "eight_ratio": statistics.median(eight[VARIANT]) / statistics.median(eight[name]),
        "same_tokens": [same, asked],
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: measure, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("embedded", "tiny"), default="embedded")
    ap.add_argument("--recipe", default="nudging", help="the suite's recipe kind (nudging, contrastive, args, ...)")
    ap.add_argument("--set", dest="settings", type=_setting, action="append", required=True,
                    help="a parameter of the variant, name=value (repeatable)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    out = asyncio.run(measure(a.suite, a.recipe, dict(a.settings), a.prompts, a.repeats, a.max_tokens))
    eight = out["eight_seconds_runs"]
    print(f"{out['recipe']} ({a.suite}) against itself with {out['settings']}")
    print("| load | recipe (s) | variant (s) | variant / recipe |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 request, {a.prompts} prompts x {a.repeats} | {out['single_seconds']['recipe']:.1f} | "
          f"{out['single_seconds']['variant']:.1f} | {out['single_ratio']:.2f}x |")
    print(f"| 8 at once, median of {a.repeats} | {statistics.median(eight['recipe']):.1f} | "
          f"{statistics.median(eight['variant']):.1f} | {out['eight_ratio']:.2f}x |")
    print(f"same tokens: {out['same_tokens'][0]}/{out['same_tokens'][1]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``make quality``: what the embedded default's recipes write, next to the base and the aligner alone.

A fixed set of instructions goes, greedy, through Gemma-3-270M alone (base), SmolLM2-135M-Instruct alone
(aligner) and each recipe of the embedded default. Per target it prints the share of output tokens each
role wrote (``alignment_trace.role_token_share``) and simple behaviour measures: how often the answer stops
cleanly (finish reason ``stop`` and no new ``Question:`` line), how often it runs on into a new
``Question:``, and for the JSON recipe how often the output parses as JSON. Three prompts are printed side
by side (Markdown, for the README), and everything is written to ``bench/results/quality-<time>.json``.

    python -m bench.quality [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, servers
from bench.configs import embedded_suite

__all__ = ["INSTRUCTIONS", "JSON_INSTRUCTIONS", "Target", "main", "measure"]

INSTRUCTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one or two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "Is it safe to look directly at the sun?",
    "Name two primary colours.",
    "Translate 'good morning' into French.",
]
JSON_INSTRUCTIONS = [
    "Describe a fictional person as a JSON object with a name and an age.",
    "Give the capital of Italy as JSON with keys country and capital.",
    "Return a JSON object listing three fruits under the key fruits.",
    "Write a JSON object with the title and year of a famous film.",
]
SIDE_BY_SIDE = [0, 2, 5]  # the prompts shown in the README
RUN_ON = re.compile(r"(^|\n)\s*Question:")


@dataclass
class Target:
    """A model or recipe under test, and what it wrote."""

    name: str
    label: str
    instructions: list[str]
    json_output: bool = False
    outputs: list[load.Result] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Shares per role and behaviour measures over all outputs."""
        counts: dict[str, int] = {}
        for r in self.outputs:
            for role, c in ((r.trace or {}).get("role_token_counts") or {}).items():
                counts[role] = counts.get(role, 0) + c
        total = sum(counts.values())
        n = len(self.outputs) or 1
        run_on = sum(bool(RUN_ON.search(r.text)) for r in self.outputs)
        clean = sum(r.finish_reason == "stop" and not RUN_ON.search(r.text) for r in self.outputs)
        out: dict[str, Any] = {
            "target": self.name,
            "label": self.label,
            "requests": len(self.outputs),
            "role_token_share": {k: round(v / total, 3) for k, v in counts.items()} if total else {},
            "stops_cleanly": round(clean / n, 3),
            "runs_on_into_question": round(run_on / n, 3),
            "mean_tokens": round(sum(r.tokens for r in self.outputs) / n, 1),
            "mean_seconds": round(sum(r.seconds for r in self.outputs) / n, 2),
        }
        if self.json_output:
            out["valid_json"] = round(sum(_is_json(r.text) for r in self.outputs) / n, 3)
        return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def targets() -> list[Target]:
    """Base alone, aligner alone, and each recipe of the embedded default (the JSON one on JSON prompts)."""
    return [
        Target("gemma-3-270m", "base alone (Gemma-3-270M)", INSTRUCTIONS),
        Target("smollm2-135m-instruct", "aligner alone (SmolLM2-135M-Instruct)", INSTRUCTIONS),
        Target("nudging", "nudging (Gemma base, SmolLM2 aligner)", INSTRUCTIONS),
        Target("urial", "URIAL (Gemma base, in-context)", INSTRUCTIONS),
        Target("contrastive-prompt", "contrastive (SmolLM2 vs itself, adversarial prompt)", INSTRUCTIONS),
        Target("smollm2-135m-instruct", "aligner alone on JSON prompts", JSON_INSTRUCTIONS),
        Target("json", "json (SmolLM2, grammar-aligned ASAp)", JSON_INSTRUCTIONS, json_output=True),
    ]


async def measure(api_url: str, max_tokens: int) -> list[Target]:
    """Every target on its instructions, one request at a time."""
    client = load.client(api_url)
    ts = targets()
    try:
        for t in ts:
            print(f"  {t.label} ...", flush=True)
            for instruction in t.instructions:
                msgs = [{"role": "user", "content": instruction}]
                recipe = t.name not in ("gemma-3-270m", "smollm2-135m-instruct")
                t.outputs.append(await load.chat(client, t.name, msgs, max_tokens, trace=recipe))
    finally:
        await client.close()
    return ts


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(text.split())
    return (text[: limit - 1] + "…") if len(text) > limit else text


def side_by_side(ts: list[Target]) -> str:
    """Three prompts, one row each, the base, the aligner and each text recipe in columns (Markdown)."""
    cols = [t for t in ts if t.instructions is INSTRUCTIONS]
    lines = ["| prompt | " + " | ".join(t.label for t in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for i in SIDE_BY_SIDE:
        cells = [_cell(t.outputs[i].text).replace("|", "\\|") for t in cols]
        lines.append(f"| {INSTRUCTIONS[i]} | " + " | ".join(cells) + " |")
    j = next(t for t in ts if t.json_output)
    lines.append("")
    lines.append(f"JSON recipe, \"{JSON_INSTRUCTIONS[0]}\": `{_cell(j.outputs[0].text)}`")
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Per target: role shares and behaviour (Markdown)."""
    lines = ["| target | tokens written by | stops cleanly | runs on into \"Question:\" | valid JSON | mean tokens |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        share = ", ".join(f"{k} {v:.0%}" for k, v in r["role_token_share"].items()) or "itself"
        vj = f"{r['valid_json']:.0%}" if "valid_json" in r else "-"
        lines.append(f"| {r['label']} | {share} | {r['stops_cleanly']:.0%} | {r['runs_on_into_question']:.0%} | "
                     f"{vj} | {r['mean_tokens']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the embedded default, run every target, print and write the results."""
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args(argv)
    suite = embedded_suite()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="alignd-quality-") as tmp:
        print("starting the embedded default ...", flush=True)
        server = servers.start_alignd(suite.config, Path(tmp), "alignd-quality", prepare=True)
        try:
            ts = asyncio.run(measure(server.api_url, args.max_tokens))
        finally:
            servers.stop(server)
    rows = [t.summary() for t in ts]
    print("\n" + summary_table(rows) + "\n\n" + side_by_side(ts) + "\n")
    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "max_tokens": args.max_tokens,
        "summary": rows,
        "outputs": {t.label: [{"instruction": i, "text": r.text, "finish_reason": r.finish_reason,
                               "tokens": r.tokens, "role_token_share": (r.trace or {}).get("role_token_share")}
                              for i, r in zip(t.instructions, t.outputs)] for t in ts},
        "markdown": {"summary": summary_table(rows), "side_by_side": side_by_side(ts)},
    }
    from bench.report import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

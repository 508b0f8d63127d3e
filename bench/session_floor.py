"""What one step of a streaming-input session costs with no decoder at all: the price of the mechanism that
every lockstep row pays per role and merged token.

A token-level decoder steps one session per role for every token it merges (alignd's engine layer over
vLLM 0.32's streaming-input requests: the chosen token is appended as a new chunk, the engine writes the
next position's view). This measures that mechanism alone, on one model in this process: the prompts
decoded natively (the floor's kind of request), then stepped one token at a time through sessions asking
for the top-1 view only and appending that token (a greedy decoder that does nothing else), one request at
a time and eight at once. Both go through alignd's engine layer (``LocalVLLMEngine``); this process's CPU
time is the frontend's (the engine core is a process of its own), so a session step's CPU is what the
gateway cannot spend less than per role and merged token. (A composite row's floor runs its roles'
engines at once on the same cores, so its ratio is not bounded by this one-engine ratio; what carries over
is the price per step.) ``measure_lockstep`` does the same for a recipe's roles on distinct models: their
sessions stepped in lockstep (every step reads all their views at once and appends one token to each)
against the same models decoding natively at once, each on the cores the server gives it: what that
recipe's lockstep rows cannot go under, however cheap the decoder and the gateway around it.

    python -m bench.session_floor tiny        # or: embedded
    python -m bench.session_floor tiny --lockstep tiny-base,tiny-amateur
    python -m bench.session_floor --model /path/to/checkpoint --dtype bfloat16
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SessionFloor", "measure", "measure_lockstep", "prompts", "suite_models"]


@dataclass(frozen=True)
class SessionFloor:
    """Native decoding against bare session steps on the same prompts and token counts."""

    concurrency: int
    """Requests in flight at once."""
    tokens: int
    """Tokens written each way, by all roles."""
    native_ms: float
    """Wall time per natively decoded token of one request (the engine step, when requests run at once; with
    several roles, all of them decoding at once)."""
    session_ms: float
    """Wall time per session step of one request (one token appended to each role's session, their top-1
    views read)."""
    native_cpu_ms: float
    """This process's CPU time per natively decoded token and role (vLLM's frontend and alignd's engine
    layer)."""
    session_cpu_ms: float
    """This process's CPU time per session step and role."""

    @property
    def ratio(self) -> float:
        """Session step against native token, wall time."""
        return self.session_ms / self.native_ms

    def to_json(self) -> dict[str, Any]:
        """The measurement as JSON, with the ratio."""
        return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "ratio": round(self.ratio, 4)}


async def measure(path: str, dtype: str, max_model_len: int, loads: list[tuple[int, list[list[int]]]],
                  max_tokens: int, rounds: int) -> list[SessionFloor]:
    """Start one engine on ``path``, warm it, then for each load (its prompts sent ``concurrency`` at a
    time) alternate native decoding and bare session steps of ``max_tokens`` tokens per prompt for ``rounds``
    rounds (who goes first alternates); one result per load."""
    models: dict[str, tuple[str, list[int] | None]] = {"floor": (path, None)}
    return (await measure_lockstep(models, [["floor"]], dtype, max_model_len, loads, max_tokens, rounds))[0]


async def measure_lockstep(
    models: dict[str, tuple[str, list[int] | None]], groups: list[list[str]], dtype: str, max_model_len: int,
    loads: list[tuple[int, list[list[int]]]], max_tokens: int, rounds: int,
) -> list[list[SessionFloor]]:
    """Start one engine per model (``name -> (path, its worker's CPU cores or None)``), then for each group of
    models (the roles of a lockstep recipe) and each load, alternate: every model of the group decoding the
    prompts natively at once (the floor's kind of request), and one session per model stepped in lockstep,
    each step reading every session's top-1 view at once and appending the first model's token to all (a
    decoder that does nothing). Results per group, then per load; CPU times count per role and token."""
    from alignd.decoders.contract import ViewSpec
    from alignd.server.engines.base import SamplingSpec
    from alignd.server.engines.vllm_local import LocalVLLMEngine
    from alignd.server.settings import ModelSettings

    engines = {name: LocalVLLMEngine(name, ModelSettings(path=path, dtype=dtype, max_model_len=max_model_len),
                                     cores=cores)
               for name, (path, cores) in models.items()}
    top1 = ViewSpec(top_k=1)
    spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def native(group: list[str], ids: list[int], tag: str) -> int:
        async def one(engine: LocalVLLMEngine) -> int:
            written = 0
            async for update in engine.generate(tag, ids, spec):
                written += sum(len(c.token_ids) for c in update.choices)
            return written

        return sum(await asyncio.gather(*(one(engines[m]) for m in group)))

    async def lockstep(group: list[str], ids: list[int], tag: str) -> int:
        sessions = [engines[m].open_session(tag) for m in group]
        context = list(ids)
        try:
            for _ in range(max_tokens):
                views = await asyncio.gather(*(s.view(context, top1) for s in sessions))
                assert views[0].token_ids is not None
                context.append(int(views[0].token_ids[0]))
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
        return max_tokens * len(group)

    async def timed(fn: Any, group: list[str], prompts: list[list[int]], tag: str) -> tuple[float, float, int]:
        w0, c0 = time.perf_counter(), time.process_time()
        written = await asyncio.gather(*(fn(group, ids, f"{tag}-{j}") for j, ids in enumerate(prompts)))
        return time.perf_counter() - w0, time.process_time() - c0, sum(written)

    results: list[list[SessionFloor]] = []
    try:
        for engine in engines.values():  # one after another, as the server starts them
            await engine.start()
        for gi, group in enumerate(groups):
            await native(group, loads[0][1][0], f"warm-native-{gi}")
            await lockstep(group, loads[0][1][0], f"warm-session-{gi}")
            per_load = []
            for i, (concurrency, load) in enumerate(loads):
                batches = [load[k:k + concurrency] for k in range(0, len(load), concurrency)]
                totals = {"native": [0.0, 0.0, 0], "session": [0.0, 0.0, 0]}
                for r in range(rounds):
                    order = ("native", "session") if r % 2 == 0 else ("session", "native")
                    for kind in order:
                        for b, batch in enumerate(batches):
                            wall, cpu, n = await timed(native if kind == "native" else lockstep, group, batch,
                                                       f"{kind}-{gi}-{i}-{r}-{b}")
                            t = totals[kind]
                            t[0], t[1], t[2] = t[0] + wall, t[1] + cpu, int(t[2]) + n
                (nw, nc, nn), (sw, sc, sn) = totals["native"], totals["session"]
                if nn != sn:
                    raise RuntimeError(f"native decoding wrote {nn} tokens, the sessions {sn}")
                steps = 1000 * concurrency * len(group) / sn  # per step of one request (all its roles)
                per_load.append(SessionFloor(concurrency, int(sn), nw * steps, sw * steps, nc * 1000 / sn,
                                             sc * 1000 / sn))
            results.append(per_load)
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return results


def suite_models(config: dict[str, Any], names: list[str]) -> dict[str, tuple[str, list[int] | None]]:
    """``names`` of a suite's server ``config`` as :func:`measure_lockstep` takes them: each model's path and
    the CPU cores that server gives it (``cpu_binding: spread``)."""
    from alignd.server.models import core_shares
    from alignd.server.settings import Settings

    cores = core_shares(Settings(**config))
    return {m: (config["models"][m]["path"], cores.get(m)) for m in names}


def prompts(path: str, texts: list[str]) -> list[list[int]]:
    """``texts`` in the token ids of the model at ``path`` (plain text, no chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [list(tok(t)["input_ids"]) for t in texts]


def main(argv: list[str] | None = None) -> int:
    """Measure one suite's plain model, or any local checkpoint, and print the results."""
    import argparse

    from bench.configs import INSTRUCTIONS, embedded_suite, tiny_suite

    p = argparse.ArgumentParser(prog="python -m bench.session_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", nargs="?", default="tiny", choices=("tiny", "embedded"),
                   help="whose plain model to measure (default tiny)")
    p.add_argument("--model", help="a local checkpoint folder to measure instead")
    p.add_argument("--dtype", default="auto", help="with --model: vLLM's dtype (default auto)")
    p.add_argument("--max-model-len", type=int, default=2048, help="with --model: context length (default 2048)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--lockstep", help="comma-separated models of the suite to step in lockstep instead, on the "
                   "cores the suite's server gives them")
    a = p.parse_args(argv)
    if a.model:
        path, dtype, max_len = a.model, a.dtype, a.max_model_len
    else:
        suite = embedded_suite() if a.suite == "embedded" else tiny_suite()
        path, dtype, max_len = suite.plain_path, suite.plain_dtype, suite.max_model_len
    ids = prompts(path, INSTRUCTIONS[:8])
    loads = [(1, ids[:4]), (8, ids)]
    if a.lockstep and not a.model:
        group = a.lockstep.split(",")
        models = suite_models(suite.config, group)
        floors = asyncio.run(measure_lockstep(models, [group], dtype, max_len, loads, a.max_tokens, 2))[0]
    else:
        floors = asyncio.run(measure(path, dtype, max_len, loads, a.max_tokens, 2))
    for floor in floors:
        print(floor.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())

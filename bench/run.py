"""``make bench``: issue #4's speed table, measured side by side in one run on this machine.

Two suites, each on its own alignd server: the tiny generated models (every decoder on distinct models with
one vocabulary) and the embedded default models. Per suite, before the server starts: a bare session step
against a native token on the suite's plain model, and the models of each lockstep recipe with distinct
models stepped in lockstep with no decoder against their native decoding (reported: the price of the
session mechanism, see ``bench.session_floor``). Then: composite recipes against their floors (one
request at a time and eight at once), against a naive resubmitting gateway, speculative on and off, the
gateway's CPU time per merged token, and a plain model through alignd against vLLM's own server. On the
embedded default also: start-up time to a healthy ``/health``, peak memory of the whole server, and the
gateway's memory over a sustained run. Prints one table and writes ``bench/results/<time>-<mode>.json``
and ``bench/results/latest.json``.

    python -m bench.run            # full (about 30 minutes on 2 cores, 10 of them the memory run)
    python -m bench.run --quick    # fewer prompts, shorter outputs, a short soak (about 5 minutes)
    python -m bench.run --suites embedded --only nudging   # some rows only (latest.json is left alone)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load, servers, session_floor
from bench.configs import COPY_INSTRUCTIONS, INSTRUCTIONS, Suite, embedded_suite, tiny_suite
from bench.procs import MemorySampler
from bench.report import Report, Row
from bench.scenarios import SuiteBench, percentile

__all__ = ["ROW_GROUPS", "Options", "main", "run"]

SOAK_SECONDS = 600.0  # the "gateway memory over a 10-minute run"
# A plain-throughput round on the tiny pair lasts about half a second at 16 requests: too short to compare
# on a shared machine, so its rounds carry more requests.
TINY_THROUGHPUT_SCALE = 4

ROW_GROUPS = ("session", "nudging", "contrastive", "logit_arithmetic", "args", "speculative", "plain", "soak")


@dataclass
class Options:
    """What one run measures."""

    quick: bool
    suites: list[str]
    max_tokens: int
    single_prompts: int
    soak_seconds: float
    vllm: bool
    throughput_requests: int
    rounds: int
    repeats: int = 1  # runs of each composite measurement, of which the median counts
    strict: bool = False
    only: frozenset[str] = frozenset()  # row groups to measure (empty: all of them)

    def wants(self, group: str) -> bool:
        """Whether this run measures ``group`` (a recipe kind, ``speculative``, ``plain`` or ``soak``)."""
        return not self.only or group in self.only


def _options(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts, shorter outputs, short soak")
    p.add_argument("--suites", default="tiny,embedded", help="comma-separated: tiny, embedded")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per composite request")
    p.add_argument("--soak-seconds", type=float, default=None,
                   help="length of the gateway memory run (default 600, as the issue asks; quick 45)")
    p.add_argument("--no-vllm", action="store_true", help="skip the comparison with vLLM's own server")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each composite measurement, of which the median counts (default 3; quick 1)")
    p.add_argument("--strict", action="store_true", help="exit with 1 when a row misses its target")
    p.add_argument("--only", default="", help="comma-separated row groups to measure (while working on them): "
                   + ", ".join(ROW_GROUPS))
    a = p.parse_args(argv)
    unknown = {g.strip() for g in a.only.split(",") if g.strip()} - set(ROW_GROUPS)
    if unknown:
        p.error(f"--only: unknown row groups {sorted(unknown)} (known: {', '.join(ROW_GROUPS)})")
    return Options(
        quick=a.quick,
        suites=[s.strip() for s in a.suites.split(",") if s.strip()],
        max_tokens=a.max_tokens or (32 if a.quick else 64),
        single_prompts=2 if a.quick else 4,
        soak_seconds=a.soak_seconds if a.soak_seconds is not None else (45.0 if a.quick else SOAK_SECONDS),
        vllm=not a.no_vllm,
        throughput_requests=8 if a.quick else 16,
        rounds=1 if a.quick else 3,
        repeats=a.repeats or (1 if a.quick else 3),
        strict=a.strict,
        only=frozenset(g.strip() for g in a.only.split(",") if g.strip()),
    )


async def _measure_suite(suite: Suite, server: servers.Server, opts: Options, report: Report,
                         workdir: Path) -> dict[str, Any]:
    """Every per-suite row; returns raw data for the JSON."""
    b = SuiteBench(suite, server.api_url, server.base_url, server.pid)
    label = suite.label
    raw: dict[str, Any] = {}
    single = INSTRUCTIONS[: opts.single_prompts]
    eight = INSTRUCTIONS[:8]
    try:
        for recipe in suite.recipes.values():
            await b.warm(recipe)
        # one request at a time
        for kind, limit in (("nudging", 1.15), ("contrastive", 1.15), ("logit_arithmetic", 1.15), ("args", 1.30)):
            one = suite.recipes.get(kind)
            if one is None or not opts.wants(kind):
                continue
            r = await b.single(one, single, opts.max_tokens, opts.repeats)
            raw[f"{kind}_single"] = r.to_json()
            what = f"{kind.replace('_', ' ')}" + (" (k=10, implicit reward)" if kind == "args" else "")
            report.ratio(f"{what}: time / floor, 1 request", label, r.ratio, limit, data=r.to_json())
            if kind == "nudging" and r.detail.get("aligner_steps_bound") is not None:
                d = r.detail
                report.reported("nudging: the aligner's forward steps alone, natively / floor, 1 request (its whole "
                                "blocks, of which the floor counts the words it wrote)", label,
                                f"{d['aligner_steps_bound']:.2f}x ({d['aligner_steps']} steps for "
                                f"{d['aligner_tokens']} tokens written)", d["aligner_steps_bound"], r.to_json())
        # eight at once, and the naive gateway on the same prompts and lengths
        for kind in ("nudging", "contrastive", "logit_arithmetic"):
            many = suite.recipes.get(kind)
            if many is None or not opts.wants(kind):
                continue
            r, results = await b.concurrent(many, eight, opts.max_tokens, opts.repeats)
            raw[f"{kind}_concurrent"] = r.to_json()
            report.ratio(f"{kind.replace('_', ' ')}: time / floor, 8 concurrent", label, r.ratio, 1.30,
                         data=r.to_json())
            if kind == "nudging":
                continue
            naive = await b.naive(many, eight, results)
            speedup = naive / r.seconds
            data: dict[str, Any] = {"naive_seconds": round(naive, 3), "alignd_seconds": round(r.seconds, 3),
                                    "tokens": r.tokens}
            raw[f"{kind}_naive"] = data
            report.ratio(f"{kind.replace('_', ' ')} vs naive gateway (resubmit + 1 token), 8 concurrent", label,
                         speedup, 3.0, at_most=False, data=data)
        # speculative draft-and-verify on and off
        if "contrastive_spec" in suite.recipes and opts.wants("speculative"):
            off = suite.recipes.get("contrastive_spec_off", suite.recipes["contrastive"])
            r = await b.speculative(off, suite.recipes["contrastive_spec"], single, opts.max_tokens,
                                    draft_role="expert", repeats=opts.repeats)
            raw["speculative"] = r.to_json()
            same = r.detail["same_tokens"]
            report.ratio("speculative contrastive, the expert drafting: speed-up over the same recipe without it",
                         label, r.ratio, 1.8, at_most=False, data=r.to_json(),
                         fmt=lambda v: f"{v:.2f}x (same tokens {same}, drafts kept {r.detail['draft_acceptance']:.0%})")
            if "draft_alone_bound" in r.detail:
                d = r.detail
                report.reported("speculative contrastive, the expert drafting: the most it can give (the recipe "
                                "without it / the expert alone, natively, same answers)", label,
                                f"{d['draft_alone_bound']:.2f}x ({r.seconds:.2f} vs {d['draft_alone_seconds']:.2f} s)",
                                d["draft_alone_bound"], r.to_json())
        if "contrastive_ngram" in suite.recipes and opts.wants("speculative"):
            copying = COPY_INSTRUCTIONS[: opts.single_prompts]
            g = await b.speculative(suite.recipes["contrastive"], suite.recipes["contrastive_ngram"], copying,
                                    opts.max_tokens, repeats=opts.repeats)
            raw["speculative_ngram"] = g.to_json()
            report.ratio("speculative contrastive, prompt-lookup drafts on copying prompts: speed-up", label,
                         g.ratio, 1.8, at_most=False, data=g.to_json(),
                         fmt=lambda v: f"{v:.2f}x (same tokens {g.detail['same_tokens']}, "
                                       f"drafts kept {g.detail['draft_acceptance']:.0%})")
        # gateway CPU per merged token (sequential requests only)
        samples = [s for values in b.cpu_per_token.values() for s in values]
        p50, p99 = percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000
        per_recipe = {k: round(percentile(v, 0.5) * 1000, 3) for k, v in b.cpu_per_token.items()}
        data = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "samples": len(samples),
                "p50_ms_by_recipe": per_recipe}
        raw["gateway_cpu"] = data
        if samples:
            report.add(Row("gateway CPU time per merged token (gateway process, engines excluded)", label,
                           "p50 <= 1 ms", f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", p50 <= 1.0, p50, data))
        # plain model: alignd against vLLM's own server
        if opts.vllm and opts.wants("plain") and (suite.name == "embedded" or not opts.quick):
            raw["plain_vs_vllm"] = await _plain_vs_vllm(b, suite, server, opts, report, workdir)
    except BaseException:
        await b.close()
        raise
    raw["_bench"] = b  # the caller runs the soak with it, then closes it
    return raw


async def _plain_vs_vllm(b: SuiteBench, suite: Suite, server: servers.Server, opts: Options, report: Report,
                         workdir: Path) -> dict[str, Any]:
    what = "plain model through alignd vs vLLM's own server (throughput, 8 concurrent)"
    vserver = None
    for attempt in range(2):  # a busy machine sometimes fails vLLM's engine start-up: try once more
        try:
            vserver = await asyncio.to_thread(servers.start_vllm, suite.plain_path, suite.plain_model, workdir,
                                              dtype=suite.plain_dtype, max_model_len=suite.max_model_len)
            break
        except Exception as exc:  # noqa: BLE001
            error = str(exc)
            print(f"   vLLM's server did not start (attempt {attempt + 1}): {error.splitlines()[0][:200]}", flush=True)
            await asyncio.sleep(10)
    if vserver is None:
        report.missing(what, suite.label, ">= 0.95", "vLLM's server did not start twice (see the JSON)")
        return {"error": error[-6000:]}
    vclient = load.client(vserver.api_url)
    requests = opts.throughput_requests * (TINY_THROUGHPUT_SCALE if suite.name == "tiny" else 1)
    prompts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(requests)]
    mt = opts.max_tokens
    try:
        await b.throughput(b.client, suite.plain_model, prompts[:2], 8, 2)  # warm both
        await b.throughput(vclient, suite.plain_model, prompts[:2], 8, 2)
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(opts.rounds):
            # who goes first alternates, so a drift in the machine's load does not favour one side
            for side in ((b.client, ours), (vclient, theirs))[:: 1 if i % 2 == 0 else -1]:
                side[1].append((await b.throughput(side[0], suite.plain_model, prompts, mt, 8))[0])
    finally:
        await vclient.close()
        await asyncio.to_thread(servers.stop, vserver)
    ratio = sum(ours) / sum(theirs)
    data = {"alignd_tok_s": [round(x, 1) for x in ours], "vllm_tok_s": [round(x, 1) for x in theirs],
            "requests_per_round": requests, "vllm_startup_s": round(vserver.startup_s, 1)}
    report.ratio(what, suite.label, ratio, 0.95, at_most=False, data=data,
                 fmt=lambda v: f"{v:.2f}x ({sum(ours) / len(ours):.0f} vs {sum(theirs) / len(theirs):.0f} tok/s)")
    return data


def _soak_row(suite: Suite, report: Report, raw: dict[str, Any], soak: dict[str, Any], seconds: float) -> None:
    what = "gateway memory after warm-up over a sustained run"
    raw["soak"] = soak
    if "growth" not in soak:
        report.missing(what, suite.label, "growth <= 10%", soak.get("error", "?"))
        return
    asked = "" if seconds >= SOAK_SECONDS else f"; the issue asks {SOAK_SECONDS:.0f} s"
    report.add(Row(f"{what} ({seconds:.0f} s{asked})", suite.label, "growth <= 10%",
                   f"{soak['growth']:+.1%} ({soak['rss_after_warmup_mib']:.0f} -> "
                   f"peak {soak['rss_peak_after_warmup_mib']:.0f} MiB)",
                   soak["growth"] <= 0.10, soak["growth"], soak))


async def _session_floor_rows(suite: Suite, opts: Options, report: Report) -> list[dict[str, Any]]:
    """Bare session steps against native tokens on the suite's plain model, one request at a time and eight at
    once (reported, no target): the price of the session mechanism itself, which every lockstep row pays per
    role and token (see ``bench.session_floor``)."""
    print(f"\n== {suite.label}: bare session steps against native decoding ({suite.plain_model})", flush=True)
    try:
        ids = await asyncio.to_thread(session_floor.prompts, suite.plain_path, INSTRUCTIONS[:8])
        floors = await session_floor.measure(suite.plain_path, suite.plain_dtype, suite.max_model_len,
                                             [(1, ids[: opts.single_prompts]), (8, ids)], opts.max_tokens,
                                             max(2, opts.rounds))
    except Exception as exc:  # noqa: BLE001 - a reported row must not cost the suite's measured ones
        traceback.print_exc()
        report.missing("one engine, bare session step / native token", suite.label, "reported",
                       f"{type(exc).__name__}: {str(exc)[:200]}")
        return [{"error": f"{type(exc).__name__}: {exc}"[-4000:]}]
    for f in floors:
        load = "1 request" if f.concurrency == 1 else f"{f.concurrency} concurrent"
        report.reported(f"one engine, bare session step (top-1 view, no decoder) / native token, {load}",
                        suite.label, f"{f.ratio:.2f}x ({f.session_ms:.2f} vs {f.native_ms:.2f} ms)", f.ratio,
                        f.to_json())
    one = floors[0]
    report.reported("one engine, gateway CPU per bare session step, 1 request (per role of a merged token)",
                    suite.label, f"{one.session_cpu_ms:.2f} ms (native decoding {one.native_cpu_ms:.2f} ms per token)",
                    one.session_cpu_ms, one.to_json())
    return [f.to_json() for f in floors] + await _lockstep_floor_rows(suite, opts, report, ids)


async def _lockstep_floor_rows(suite: Suite, opts: Options, report: Report, ids: list[list[int]]
                               ) -> list[dict[str, Any]]:
    """For each lockstep recipe whose roles are distinct models: those models' bare sessions stepped in
    lockstep (top-1 views, no decoder) against the same models decoding natively at once, on the cores the
    server gives them (reported: what the recipe's rows cannot go under on vLLM 0.32's sessions)."""
    groups = {kind: [m for m, _ in info.lockstep_roles.values()] for kind, info in suite.recipes.items()
              if kind in ("contrastive", "logit_arithmetic")}
    groups = {kind: g for kind, g in groups.items() if len(set(g)) == len(g) > 1}
    if not groups:
        return []
    print(f"\n== {suite.label}: bare sessions in lockstep against native decoding ({', '.join(groups)})", flush=True)
    models = session_floor.suite_models(suite.config, sorted({m for g in groups.values() for m in g}))
    cores = {m: c for m, (_, c) in models.items()}
    try:
        measured = await session_floor.measure_lockstep(
            models, list(groups.values()), suite.plain_dtype, suite.max_model_len,
            [(1, ids[: opts.single_prompts]), (8, ids)], opts.max_tokens, max(2, opts.rounds))
    except Exception as exc:  # noqa: BLE001 - a reported row must not cost the suite's measured ones
        traceback.print_exc()
        report.missing("roles' bare sessions in lockstep / roles natively", suite.label, "reported",
                       f"{type(exc).__name__}: {str(exc)[:200]}")
        return [{"error": f"{type(exc).__name__}: {exc}"[-4000:]}]
    out = []
    for (kind, group), floors in zip(groups.items(), measured, strict=True):
        where = ", ".join(f"{m} on core {','.join(map(str, cores[m]))}" for m in group if cores.get(m))
        for f in floors:
            load = "1 request" if f.concurrency == 1 else f"{f.concurrency} concurrent"
            data = {"recipe": kind, "models": group, "cores": {m: cores.get(m) for m in group}, **f.to_json()}
            report.reported(f"{kind.replace('_', ' ')}'s {len(group)} models, bare sessions in lockstep (top-1 "
                            f"views, no decoder) / the models natively at once, {load}", suite.label,
                            f"{f.ratio:.2f}x ({f.session_ms:.2f} vs {f.native_ms:.2f} ms per token"
                            f"{'; ' + where if where else ''})", f.ratio, data)
            out.append(data)
    return out


async def _suite(name: str, opts: Options, report: Report, workdir: Path) -> dict[str, Any]:
    suite = embedded_suite() if name == "embedded" else tiny_suite()
    floor: list[dict[str, Any]] = []
    if opts.wants("session"):  # before the server starts: nothing else runs
        floor = await _session_floor_rows(suite, opts, report)
        if opts.only == {"session"}:
            return {"session_floor": floor}
    print(f"\n== {suite.label}: starting alignd", flush=True)
    sampler: list[MemorySampler] = []
    server = await asyncio.to_thread(
        servers.start_alignd, suite.config, workdir, f"alignd-{name}", prepare=(name == "embedded"),
        on_launch=lambda pid: sampler.append(MemorySampler(pid).start()),
    )
    print(f"   healthy after {server.startup_s:.1f} s", flush=True)
    raw: dict[str, Any] = {"startup_s": round(server.startup_s, 1)}
    if floor:
        raw["session_floor"] = floor
    try:
        if name == "embedded":
            report.add(Row("`make serve` on a prepared machine: time until /health answers 200", suite.label,
                           "<= 90 s", f"{server.startup_s:.1f} s", server.startup_s <= 90, server.startup_s))
        raw.update(await _measure_suite(suite, server, opts, report, workdir))
        bench: SuiteBench = raw.pop("_bench")
        try:
            if name == "embedded" and opts.wants("soak"):
                _soak_row(suite, report, raw, await bench.soak(
                    suite.recipes["contrastive"], opts.soak_seconds, 4, 48, sampler[0]), opts.soak_seconds)
        finally:
            await bench.close()
    finally:
        await asyncio.to_thread(servers.stop, server)
        for s in sampler:
            s.stop()
    if name == "embedded" and sampler:
        peak = sampler[0].peak
        data = {"rss_gib": round(peak.rss / 2**30, 2), "pss_gib": round(peak.pss / 2**30, 2),
                "processes": peak.processes}
        raw["peak_memory"] = data
        report.add(Row("whole server (gateway + engine processes), peak resident memory", suite.label,
                       "<= 8 GiB (PSS)", f"PSS {data['pss_gib']:.2f} GiB (RSS summed {data['rss_gib']:.2f} GiB)",
                       peak.pss <= 8 * 2**30, peak.pss / 2**30, data))
    return raw


async def run(opts: Options) -> Report:
    """Measure every requested suite; returns the report (not yet written)."""
    report = Report("quick" if opts.quick else "full")
    report.extra["options"] = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in opts.__dict__.items()}
    report.extra["suites"] = {}
    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        for name in opts.suites:
            try:
                report.extra["suites"][name] = await _suite(name, opts, report, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one suite failing must not lose the other's rows
                traceback.print_exc()
                report.extra["suites"][name] = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
                report.missing(f"suite {name}", name, "-", f"{type(exc).__name__}: {str(exc)[:200]}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    opts = _options(argv)
    t0 = time.monotonic()
    report = asyncio.run(run(opts))
    print()
    report.print_table()
    path = report.write(latest=not opts.only)  # a partial run does not replace the latest full table
    print(f"\nwrote {path}{'' if opts.only else ' and latest.json'} in {time.monotonic() - t0:.0f} s")
    print("\nMarkdown:\n" + report.markdown())
    failed = [r for r in report.rows if r.passed is False]
    return 1 if opts.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())

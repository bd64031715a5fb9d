"""``python -m bench``: run the benchmarks, write bench/results/latest.json and docs/performance.md.

Expects the servers' settings in the environment (``make bench`` sources .run/espbridge.env).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import generate, report, scenarios
from bench.broadcasts import BroadcastsPlan, run_broadcasts
from bench.harness import PARTITIONS_RESPONSES, ROOT, BenchEnv, bench_env, kafka_version, say
from bench.subscriptions import SyncPlan, run_subscriptions
from shared.infra.db import connect

PARTS = ("e2e", "scale", "profile", "memory", "broadcasts", "upload", "subscriptions")


@dataclass(frozen=True)
class Sizes:
    """How big each part is."""

    events: int
    response_broadcasts: int
    """How many broadcasts the generated response events belong to."""
    upload_rows: int
    memory_bytes: int
    scale_events: int
    rounds: int
    """How often the end-to-end run, the upload and their limits are each measured (best kept)."""
    broadcasts: int
    """Broadcasts of the many-broadcasts part (a tenth of them scheduled)."""
    broadcast_recipients: int
    broadcasts_timeout_s: float
    """How long the many-broadcasts part waits from the publication before it reports what finished."""
    sync_changes: int
    """Subscription changes of the subscriptions part, each way."""

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        """The issue's sizes, or QUICK ones for a run of a few minutes."""
        if quick:
            return cls(200_000, 8, 200_000, 100 * 10**6, 200_000, 2, 60, 500, 480, 40)
        return cls(1_000_000, 8, 1_000_000, 2**30, 200_000, 3, 500, 2000, 900, 200)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _command(*argv: str) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (
        (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else ""
    )


async def machine(env: BenchEnv) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    conn = await connect(env.pg)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kafka": kafka_version(env.kafka.bootstrap_servers),
        "postgresql": pg_version,
        "openssh": _command("ssh", "-V"),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = Sizes.for_run(args.quick)
    sizes = Sizes(
        args.events or sizes.events,
        sizes.response_broadcasts,
        args.upload_rows or sizes.upload_rows,
        args.memory_mb * 10**6 if args.memory_mb else sizes.memory_bytes,
        args.scale_events or sizes.scale_events,
        args.rounds or sizes.rounds,
        args.broadcasts or sizes.broadcasts,
        args.broadcast_recipients or sizes.broadcast_recipients,
        args.broadcasts_timeout or sizes.broadcasts_timeout_s,
        args.sync_changes or sizes.sync_changes,
    )
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    results: dict[str, Any] = {k: None for k in report.KEYS}
    results["scale"] = {}
    details: dict[str, Any] = {"sizes": {k: v for k, v in vars(sizes).items()}}
    async with bench_env(os.environ, keep_work=args.keep_work) as env:
        results = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(
                _git("status", "--porcelain", "--untracked-files=no", "--", "shared", "services", "bench")
            ),
            "quick": args.quick,
            "parts": sorted(parts),
            "machine": await machine(env),
            **results,
        }
        first = None
        if parts & {"e2e", "scale", "profile"}:
            say(f"generating about {sizes.events:,} response events")
            t = time.monotonic()
            folder = env.work / "responses"
            folder.mkdir()
            broadcasts = generate.plan_broadcasts(
                env.token, sizes.events, sizes.response_broadcasts, generate.now_utc()
            )
            limit_csv = env.work / "limit-events.csv"
            with limit_csv.open("w", encoding="utf-8", newline="") as out:
                files = generate.write_response_files(
                    folder, broadcasts, args.seed, "sandbox", env.account, f"{env.remote_root}/responses", out
                )
            await scenarios.record_jobs(env, broadcasts)
            events = sum(f.rows for f in files)
            say(f"  {events:,} events in {len(files)} files ({time.monotonic() - t:.0f} s)")
            paths = [folder / f.name for f in files]
            if "e2e" in parts:
                say(
                    "end-to-end ingestion (loaders=1, gatherers=1) and psql \\copy of the same rows, "
                    f"{sizes.rounds} times each"
                )
                # Each measured in turns, and the best of each taken: neither side profits from warm
                # caches (or suffers a neighbour's burst) more than the other.
                limit_runs: list[float] = []
                ingest_runs: list[scenarios.IngestRun] = []
                for _ in range(sizes.rounds):
                    limit_runs.append(await scenarios.copy_limit(env, limit_csv))
                    ingest_runs.append(await scenarios.ingest(env, paths, events))
                first = min(ingest_runs, key=lambda r: r.seconds)
                limit_s = min(limit_runs)
                say(f"  limit: psql \\copy {' s / '.join(f'{s:.1f}' for s in limit_runs)} s")
                results["e2e_events"] = events
                results["e2e_events_per_s"] = round(first.events_per_s)
                results["e2e_limit_events_per_s"] = round(events / limit_s)
                results["e2e_ratio"] = round(first.events_per_s / (events / limit_s), 3)
                details["e2e"] = {
                    "events": events,
                    "files": len(files),
                    "bytes": sum(f.bytes for f in files),
                    "broadcasts": len(broadcasts),
                    "seconds": round(first.seconds, 2),
                    "runs_s": [round(r.seconds, 2) for r in ingest_runs],
                    "limit_s": round(limit_s, 2),
                    "limit_runs_s": [round(s, 2) for s in limit_runs],
                    "cpu_s": {k: round(v, 1) for k, v in first.cpu_s.items()},
                    "peak_rss_mb": {k: round(v, 1) for k, v in first.peak_rss_mb.items()},
                }
            # The scale and profile runs take the first broadcasts' files up to their size.
            chosen, scale_events = [], 0
            for b in broadcasts:
                if scale_events >= sizes.scale_events:
                    break
                mine = [f for f in files if f.broadcast_id == b.job_id]
                chosen += [folder / f.name for f in mine]
                scale_events += sum(f.rows for f in mine)
            if "scale" in parts:
                say(f"scale: {scale_events:,} events per run")
                cpu: dict[str, dict[str, float]] = {}
                for loaders, gatherers in report.SCALE_RUNS:
                    if (loaders, gatherers) == (1, 1) and first is not None and scale_events == events:
                        r = first
                    else:
                        r = await scenarios.ingest(env, chosen, scale_events, loaders, gatherers)
                    results["scale"][r.label] = round(r.events_per_s)
                    cpu[r.label] = {k: round(v, 1) for k, v in r.cpu_s.items()}
                details["scale"] = {"events": scale_events, "partitions": PARTITIONS_RESPONSES, "cpu_s": cpu}
            if "profile" in parts:
                say(f"profile: py-spy on the gatherer and the loader ({scale_events:,} events)")
                r = await scenarios.ingest(env, chosen, scale_events, profile=True)
                measured = first or r
                busy = {k: v / measured.seconds for k, v in measured.cpu_s.items()}
                slowest = max(busy, key=lambda k: busy[k])
                results["profile"] = {
                    "tool": "py-spy record --rate 50 --nonblocking (own samples exclude idle waiting)",
                    "events": scale_events,
                    "events_per_s_while_profiled": round(r.events_per_s),
                    "slowest": slowest,
                    "why": ", ".join(f"{k} {v:.2f} CPU s per s" for k, v in busy.items()),
                    "stages": {
                        name: report.summarize_profile(path.read_text(errors="replace"))
                        for name, path in r.profiles.items()
                    },
                }
            limit_csv.unlink()
            for p in paths:
                p.unlink()
        if "memory" in parts:
            say(f"memory: one response file of {sizes.memory_bytes / 1e6:,.0f} MB")
            t = time.monotonic()
            b = generate.Broadcast(
                f"bench-{env.token}-mem",
                f"snd-{env.token}mem",
                "newsletter-mem",
                1_000_000,
                generate.now_utc(),
            )
            big = env.work / generate.file_name(b, 1, "clicks")
            made = generate.write_clicks_file(big, b, sizes.memory_bytes, args.seed)
            await scenarios.record_jobs(env, [b])
            say(f"  {made.rows:,} events, {made.bytes / 1e6:,.0f} MB ({time.monotonic() - t:.0f} s)")
            r = await scenarios.ingest(env, [big], made.rows)
            big.unlink()
            results["gatherer_peak_rss_mb"] = round(r.peak_rss_mb["gatherer"], 1)
            results["loader_peak_rss_mb"] = round(r.peak_rss_mb["loader"], 1)
            details["memory"] = {
                "file_bytes": made.bytes,
                "events": made.rows,
                "seconds": round(r.seconds, 2),
                "events_per_s": round(r.events_per_s),
                "how": "VmHWM from /proc/<pid>/status of each process after the last row was committed",
                "note": None
                if made.bytes >= 10**9
                else f"QUICK: the file is {made.bytes / 1e6:.0f} MB, not 1 GB.",
            }
        if "broadcasts" in parts:
            plan = BroadcastsPlan(
                sizes.broadcasts,
                sizes.broadcast_recipients,
                uploaders=args.uploaders,
                monitors=args.monitors,
                timeout_s=sizes.broadcasts_timeout_s,
            )
            say(
                f"many broadcasts: {plan.broadcasts:,} of {plan.recipients:,} recipients published at once, "
                f"{plan.scheduled} scheduled {plan.scheduled_ahead_s:.0f} s ahead; "
                f"uploaders={plan.uploaders}, monitors={plan.monitors}, timeout {plan.timeout_s:.0f} s"
            )
            figures = await run_broadcasts(env, plan)
            for key in ("broadcasts_per_min", "publish_to_sent_p95_s", "scheduled_late_p95_s"):
                results[key] = figures.pop(key)
            details["broadcasts"] = {**vars(plan), **figures}
            late = results["scheduled_late_p95_s"]
            say(
                f"  {results['broadcasts_per_min']} broadcasts/min, publication → sent p95 "
                f"{results['publish_to_sent_p95_s']} s"
                + (f", scheduled ones late p95 {late} s" if late is not None else "")
                + " (cpu s to the last immediate one: "
                + ", ".join(f"{k} {v:.1f}" for k, v in figures["cpu_s"].items())
                + ")"
            )
        if "upload" in parts:
            say(f"list upload: {sizes.upload_rows:,} recipients")
            u = await scenarios.upload(
                env, sizes.upload_rows, generate.customers_for(sizes.upload_rows), sizes.rounds
            )
            results["upload_rows"] = u.rows
            results["upload_s"] = round(u.seconds, 2)
            results["upload_limit_s"] = round(u.limit_s, 2)
            results["upload_ratio"] = round(u.seconds / u.limit_s, 3)
            details["upload"] = {
                "rows": u.rows,
                "bytes": u.bytes,
                "seconds": round(u.seconds, 2),
                "runs_s": [round(s, 2) for s in u.runs_s],
                "limit_runs_s": [round(s, 2) for s in u.limit_runs_s],
                "limit_copy_s": round(u.limit_copy_s, 2),
                "limit_put_s": round(u.limit_put_s, 2),
                "limit_bytes": u.limit_bytes,
                "uploader_cpu_s": round(u.uploader_cpu_s, 1),
                "uploader_peak_rss_mb": round(u.uploader_peak_rss_mb, 1),
                "seed_customers_s": round(u.seed_s, 1),
            }
        if "subscriptions" in parts:
            sync = SyncPlan(sizes.sync_changes)
            say(
                f"subscriptions: {sync.changes} unsubscribes by MailUp's webhook ({sync.webhooks_per_s:g} a "
                f"second), then {sync.changes} CRM updates ({sync.crm_updates_per_s:g} a second)"
            )
            figures = await run_subscriptions(env, sync)
            for direction in ("webhook_to_crm", "crm_to_esp"):
                results[f"{direction}_p95_s"] = figures[direction]["p95_s"]
                results[f"{direction}_count"] = figures[direction]["arrived"]
            details["subscriptions"] = figures
        results["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["details"] = details
    results["targets"] = report.judge(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a run of a few minutes")
    parser.add_argument("--only", help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--events", type=int, help="response events of the end-to-end run")
    parser.add_argument("--upload-rows", type=int, help="recipients of the list upload")
    parser.add_argument("--memory-mb", type=int, help="size of the memory bench's response file (MB)")
    parser.add_argument("--scale-events", type=int, help="events per scale and profile run")
    parser.add_argument(
        "--rounds",
        type=_at_least_one,
        help="times the end-to-end run, the upload and their limits are measured (best kept)",
    )
    parser.add_argument("--broadcasts", type=_at_least_one, help="broadcasts of the many-broadcasts part")
    parser.add_argument(
        "--broadcast-recipients", type=_at_least_one, help="recipients of each of the many broadcasts"
    )
    parser.add_argument(
        "--broadcasts-timeout",
        type=_at_least_one,
        help="seconds the many-broadcasts part waits from the publication before it reports what finished",
    )
    parser.add_argument(
        "--uploaders", type=_at_least_one, default=2, help="uploader processes of the many-broadcasts part"
    )
    parser.add_argument(
        "--monitors", type=_at_least_one, default=2, help="monitor processes of the many-broadcasts part"
    )
    parser.add_argument(
        "--sync-changes", type=_at_least_one, help="subscription changes of the subscriptions part, each way"
    )
    parser.add_argument("--seed", type=int, default=20261122, help="seed of the generated data")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the local work folder (logs, profiles)"
    )
    parser.add_argument(
        "--render", action="store_true", help="measure nothing: rebuild the --docs page from the --out file"
    )
    args = parser.parse_args(argv)
    if args.render:
        args.docs.write_text(report.render_markdown(orjson.loads(args.out.read_bytes())))
        say(f"wrote {args.docs} from {args.out}")
        return 0
    if args.only and not set(args.only.split(",")) <= set(PARTS):
        parser.error(f"--only takes {','.join(PARTS)}")
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    args.docs.write_text(report.render_markdown(results))
    say(f"wrote {args.out} and {args.docs}")
    for key, t in results["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        say(f"  {key} = {t['value']} (target {t['target']}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

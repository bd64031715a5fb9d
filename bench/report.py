"""The bench's results: the keys, the targets, the profile summary and docs/performance.md.

Pure functions of the results mapping (what bench/results/latest.json holds), so they are tested
without servers and the page can be rebuilt from a committed JSON file.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

KEYS = (
    "e2e_events",
    "e2e_events_per_s",
    "e2e_limit_events_per_s",
    "e2e_ratio",
    "upload_rows",
    "upload_s",
    "upload_limit_s",
    "upload_ratio",
    "gatherer_peak_rss_mb",
    "loader_peak_rss_mb",
    "scale",
)
"""Every figure key of latest.json (a part not run has the key with null)."""

TARGETS: dict[str, tuple[str, float]] = {
    "e2e_ratio": (">=", 0.4),
    "upload_ratio": ("<=", 1.5),
    "gatherer_peak_rss_mb": ("<=", 300.0),
    "loader_peak_rss_mb": ("<=", 300.0),
}
"""The issue's targets: key → (comparison, bound)."""

SCALE_RUNS = ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2))
"""(loaders, gatherers) of the scale runs."""


def scale_key(loaders: int, gatherers: int) -> str:
    """The key of a scale run in ``scale``."""
    return f"loaders={loaders},gatherers={gatherers}"


def judge(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its figure and whether it is met (None when the figure was not measured)."""
    out: dict[str, dict[str, Any]] = {}
    for key, (op, bound) in TARGETS.items():
        value = results.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"target": f"{op} {bound:g}", "value": value, "met": met}
    return out


def missing_keys(results: dict[str, Any]) -> list[str]:
    """Keys latest.json must have and this mapping lacks."""
    needed = (*KEYS, "machine", "date", "git_commit", "quick", "targets")
    return [k for k in needed if k not in results]


_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def short_path(path: str) -> str:
    """A frame's file, short: site-packages/… and the repository's own paths relative, stdlib as
    ``python3.11/…``."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    for top in ("/services/", "/shared/", "/bench/", "/tools/"):
        if top in path:
            return top.lstrip("/") + path.split(top, 1)[1]
    found = re.search(r"(python3\.\d+/.*)$", path)
    return found.group(1) if found else path


def area(path: str) -> str:
    """Where a frame's code comes from: a package, a part of espbridge, or a stdlib module."""
    short = short_path(path)
    parts = short.split("/")
    if short.startswith(("services/", "shared/")):
        return "/".join(parts[:2]).removesuffix(".py")
    if short.startswith("python3."):
        return "stdlib " + parts[1].removesuffix(".py") if len(parts) > 1 else short
    return parts[0].removesuffix(".py").split(".")[0]


_ENTRY = ("<module> ", "main ", "service_main ", "run_service ")


def _own_code(name: str, path: str) -> bool:
    """espbridge's own functions, less the entry chain every sample passes through."""
    return short_path(path).startswith(("services/", "shared/")) and not name.startswith(_ENTRY)


def summarize_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks → samples, the top functions by own samples, espbridge's
    own functions by inclusive samples, and own samples per area (package or module)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            names.append((f"{m['func']} ({short_path(m['path'])})", m["path"]) if m else (frame, frame))
        own[names[-1][0]] += count
        areas[area(names[-1][1])] += count
        for name in {n for n, path in names if _own_code(n, path)}:
            inclusive[name] += count

    def pct(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "pct": round(100 * v / total, 1)} for k, v in counter.most_common(n)
        ]

    if total == 0:
        return {"samples": 0, "own": [], "inclusive": [], "areas": []}
    return {
        "samples": total,
        "own": pct(own, top),
        "inclusive": pct(inclusive, top),
        "areas": [
            {"area": k, "samples": v, "pct": round(100 * v / total, 1)} for k, v in areas.most_common(top)
        ],
    }


def _seconds(runs: list[Any]) -> str:
    """Timings of runs: ``19.3 s, 22.4 s``."""
    return ", ".join(f"{_fmt(s)} s" for s in runs)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """docs/performance.md from the results."""
    targets = results.get("targets") or judge(results)
    machine = results.get("machine", {})
    details = results.get("details", {})
    quick = bool(results.get("quick"))
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `make bench` (bench/report.py) from bench/results/latest.json:",
        "     edit the code, not this page. -->",
        "",
        "espbridge measured against the physical limits of the machine it runs on, each limit measured",
        "with the standard tools **in the same run**, so every figure is a ratio that holds still while",
        "the machine is busy with other work. "
        + (
            "**This is a QUICK run (smaller sizes, listed at the end): indicative only.**"
            if quick
            else "Sizes of the run are listed at the end."
        ),
        "",
        f"Run of {results.get('date', '?')} at commit `{str(results.get('git_commit', '?'))[:12]}`"
        + (" (with uncommitted changes)" if results.get("git_dirty") else "")
        + ".",
        "",
        "## Figures",
        "",
        "| key | figure | target | met |",
        "|---|---|---|---|",
    ]
    for key in KEYS:
        if key == "scale":
            continue
        t = targets.get(key)
        target, met = (t["target"], _fmt(t["met"])) if t else ("", "")
        lines.append(f"| `{key}` | {_fmt(results.get(key))} | {target} | {met} |")
    e2e, up, mem = details.get("e2e", {}), details.get("upload", {}), details.get("memory", {})
    lines += ["", "What each figure is:", ""]
    if e2e:
        mb = _fmt((e2e.get("bytes") or 0) / 1e6)
        limit_runs = e2e.get("limit_runs_s", [])
        runs = e2e.get("runs_s", [])
        best_of = f" (best of {len(runs)} runs: {_seconds(runs)})" if len(runs) > 1 else ""
        lines.append(
            f"- **End-to-end ingestion**: {_fmt(e2e.get('events'))} response events in "
            f"{e2e.get('files')} files ({mb} MB, generic ESP format, {e2e.get('broadcasts')} broadcasts) "
            "already on the SFTP site → rows in `responses.events`, timed from the gatherer's start "
            f"to the last row committed: {_fmt(e2e.get('seconds'))} s{best_of}. Limit: psql `\\copy` "
            "of the same rows from a local CSV into a table of the same shape and indexes, in turns "
            "with the runs, best of "
            f"{len(limit_runs)}: {_fmt(e2e.get('limit_s'))} s ({_seconds(limit_runs)})."
        )
    if up:
        mb = _fmt((up.get("bytes") or 0) / 1e6)
        runs, limit_runs = up.get("runs_s", []), up.get("limit_runs_s", [])
        best_of = f" (best of {len(runs)} runs: {_seconds(runs)})" if len(runs) > 1 else ""
        limit_best_of = (
            f"; in turns with the runs, best of {len(limit_runs)}: {_seconds(limit_runs)}"
            if len(limit_runs) > 1
            else ""
        )
        lines.append(
            f"- **List upload**: a {_fmt(up.get('rows'))}-recipient selection from `crm.customers` → "
            f"the list file ({mb} MB) on the ESP's SFTP site, timed from the job's publication to "
            f"`ListUploaded`: {_fmt(up.get('seconds'))} s{best_of}. Limit: psql `\\copy (select …) to` "
            f"a file ({_fmt(up.get('limit_copy_s'))} s) + OpenSSH `sftp put` of it "
            f"({_fmt(up.get('limit_put_s'))} s){limit_best_of}."
        )
    if mem:
        mb = _fmt((mem.get("file_bytes") or 0) / 1e6)
        lines.append(
            "- **Memory**: peak RSS (VmHWM) of the gatherer and the loader processes while ingesting "
            f"one response file of {mb} MB ({_fmt(mem.get('events'))} click events with long "
            f"tracking links) end to end ({_fmt(mem.get('events_per_s'))} events/s)."
            + (f" {mem['note']}" if mem.get("note") else "")
        )
    scale = results.get("scale") or {}
    if scale:
        lines += [
            "",
            "## Scale: processes of a stage",
            "",
            f"End-to-end events per second with more loader and gatherer processes on the same partitions "
            f"({_fmt(details.get('scale', {}).get('events'))} events per run, "
            f"{details.get('scale', {}).get('partitions', '?')} partitions; the machine has "
            f"{machine.get('cpu_count', '?')} cores shared by Kafka, PostgreSQL and every process):",
            "",
            "| loaders | gatherers | events/s | vs 1+1 |",
            "|---|---|---|---|",
        ]
        base = scale.get(scale_key(1, 1))
        for key, value in scale.items():
            parts = dict(p.split("=") for p in key.split(","))
            vs = f"{value / base:.2f} x" if base and value else "—"
            lines.append(f"| {parts.get('loaders')} | {parts.get('gatherers')} | {_fmt(value)} | {vs} |")
        cpu = details.get("scale", {}).get("cpu_s", {})
        if cpu:
            lines += [
                "",
                "CPU seconds per run (all processes of a service): which stage holds the pipeline back.",
                "",
                "| run | " + " | ".join(sorted({s for c in cpu.values() for s in c})) + " |",
                "|---|" + "---|" * len({s for c in cpu.values() for s in c}),
            ]
            names = sorted({s for c in cpu.values() for s in c})
            for key, per in cpu.items():
                lines.append(f"| {key} | " + " | ".join(_fmt(per.get(n)) for n in names) + " |")
    prof = results.get("profile") or {}
    if prof.get("stages"):
        lines += [
            "",
            "## Where the time goes",
            "",
            f"Busiest stage in the end-to-end run (CPU seconds per wall second): **{prof.get('slowest')}** "
            f"({prof.get('why', '')}). py-spy samples of each stage in a separate run "
            f"(loaders=1, gatherers=1, {_fmt(prof.get('events'))} events):",
        ]
        for stage, summary in prof["stages"].items():
            lines += [
                "",
                f"### {stage} ({_fmt(summary.get('samples'))} samples)",
                "",
                "| own time by area | % |",
                "|---|---|",
            ]
            lines += [f"| {a['area']} | {a['pct']} |" for a in summary.get("areas", [])[:8]]
            lines += ["", "| top functions (own time) | % |", "|---|---|"]
            lines += [f"| `{f['function']}` | {f['pct']} |" for f in summary.get("own", [])[:10]]
            lines += ["", "| espbridge functions (inclusive) | % |", "|---|---|"]
            lines += [f"| `{f['function']}` | {f['pct']} |" for f in summary.get("inclusive", [])[:10]]
    lines += [
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in machine.items()]
    sizes = details.get("sizes", {})
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "make bench            # full sizes: 1,000,000 events, 1,000,000 recipients, a 1 GiB response file",
        "make bench QUICK=1    # a few minutes: 200,000 events and recipients, a 100 MB response file",
        "```",
        "",
        "`make bench` starts the servers that are not running (`make up`), then runs `python -m bench`",
        "in its own `bench_*` database, `bench*.` topic prefix and ESP account folder, all removed at",
        "the end. It writes bench/results/latest.json and this page; `python -m bench --help` lists the",
        "options (only some parts, other sizes, another output file).",
    ]
    if sizes:
        lines += ["", "Sizes of this run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sizes.items()) + "."]
    return "\n".join(lines) + "\n"

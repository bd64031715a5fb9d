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
    "broadcasts_per_min",
    "publish_to_sent_p95_s",
    "scheduled_late_p95_s",
    "webhook_to_crm_p95_s",
    "webhook_to_crm_count",
    "crm_to_esp_p95_s",
    "crm_to_esp_count",
    "scale",
)
"""Every figure key of latest.json (a part not run has the key with null)."""

TARGETS: dict[str, tuple[str, float]] = {
    "e2e_ratio": (">=", 0.4),
    "upload_ratio": ("<=", 1.5),
    "gatherer_peak_rss_mb": ("<=", 300.0),
    "loader_peak_rss_mb": ("<=", 300.0),
    "broadcasts_per_min": (">=", 90.0),
    "webhook_to_crm_p95_s": ("<", 2.0),
    "crm_to_esp_p95_s": ("<", 5.0),
}
"""The issues' targets: key → (comparison, bound). A time under a bound (``<``) is also shown as
its ratio to the bound, as the other figures are ratios to the machine's limits."""

BROADCASTS_TARGET = (
    "the issue's: the 450 immediate broadcasts all sent within 5 minutes of publication "
    "(`broadcasts_per_min` >= 90), limited by the uploads and the ESP calls, never by waiting behind "
    "each other or behind the scheduled ones"
)

PHASE_MEANING = {
    "waiting for an uploader": "the jobs waited for an uploader: the uploads are the bound (more "
    "uploader processes share them, up to the partitions of `broadcast.jobs.v1`)",
    "upload": "writing the list files (selection → file on the ESP's SFTP site)",
    "waiting for a monitor": "the uploaded lists waited for a monitor to take them: how many "
    "broadcasts the monitors follow at once is the bound",
    "import": "the ESP's imports, from the import call to the monitor seeing it done",
    "send": "from the import's end to the ESP's send seen done: the send calls and the monitors' "
    "status polls",
}
"""What it means when an immediate broadcast spent most of its time in a phase (bench.broadcasts.PHASES)."""

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
        met = None if value is None else _meets(value, op, bound)
        out[key] = {"target": f"{op} {bound:g}", "value": value, "met": met}
        if op == "<":
            out[key]["ratio"] = None if value is None else round(value / bound, 3)
    return out


def _meets(value: float, op: str, bound: float) -> bool:
    match op:
        case ">=":
            return value >= bound
        case "<=":
            return value <= bound
        case "<":
            return value < bound
    raise ValueError(f"unknown comparison {op!r}")


def slowest_phase(phases: dict[str, dict[str, Any]]) -> str | None:
    """The phase with the largest mean time (None when no phase was measured)."""
    means = {name: p["mean_s"] for name, p in phases.items() if p.get("mean_s") is not None}
    return max(means, key=lambda name: means[name]) if means else None


def _broadcasts_figures(b: dict[str, Any], results: dict[str, Any]) -> str:
    """The bullet that says what the many-broadcasts figures are."""
    p95 = _fmt(results.get("publish_to_sent_p95_s"))
    if b.get("publish_to_sent_p95_is_lower_bound"):
        p95 = f"over {p95} (more than 5 % were not sent when the scenario stopped)"
    late = _fmt(results.get("scheduled_late_p95_s"))
    if b.get("scheduled_late_p95_is_lower_bound"):
        late = f"over {late} (not all were sent when the scenario stopped)"
    text = (
        f"- **Many broadcasts**: {_fmt(b.get('broadcasts'))} broadcasts of {_fmt(b.get('recipients'))} "
        f"recipients each published at once to `broadcast.jobs.v1`, {_fmt(b.get('scheduled'))} of them "
        f"(every {b.get('scheduled_every')}th) scheduled {_fmt(b.get('scheduled_ahead_s'))} s ahead, "
        "through upload → import → send against the sandbox ESP (generic flavor) with "
        f"{b.get('uploaders')} uploader and {b.get('monitors')} monitor processes. A broadcast is sent "
        "when its job's status in `control.jobs` is `send` `done`. `broadcasts_per_min`: the "
        f"{_fmt(b.get('immediate'))} immediate ones sent per minute from the publication to the last "
        f"one's end ({_fmt(b.get('immediate_sent'))} sent in {_fmt(b.get('window_s'))} s); "
        f"`publish_to_sent_p95_s`: publication → sent, 95th percentile, {p95} s (median "
        f"{_fmt(b.get('publish_to_sent_p50_s'))} s, last {_fmt(b.get('publish_to_sent_max_s'))} s); "
        "`scheduled_late_p95_s`: how long after its send time a scheduled one was sent, 95th "
        f"percentile, {late} s ({_fmt(b.get('scheduled_sent'))} of {_fmt(b.get('scheduled'))} sent, "
        f"the latest {_fmt(b.get('scheduled_late_max_s'))} s late"
        + (f", {b['scheduled_early']} before their time" if b.get("scheduled_early") else "")
        + f"). The target is {BROADCASTS_TARGET}."
    )
    if b.get("timed_out"):
        text += (
            f" **The scenario stopped at its timeout of {_fmt(b.get('timeout_s'))} s** with "
            f"{_fmt(b.get('immediate_running'))} immediate and {_fmt(b.get('scheduled_running'))} "
            "scheduled broadcasts not yet sent: the figures count what finished by then."
        )
    unsent = (b.get("immediate_unsent") or 0) + (b.get("scheduled_unsent") or 0)
    if unsent:
        text += f" {unsent} ended without a send: {'; '.join(b.get('unsent_reasons', []))}."
    most = b.get("sends_per_broadcast_max")
    if most is not None and most > 1:
        text += f" **The ESP created {most} sends for one broadcast.**"
    return text


def _broadcasts_bounds(b: dict[str, Any], cores: Any) -> list[str]:
    """The section that says what bounds the many-broadcasts figures."""
    phases: dict[str, dict[str, Any]] = b.get("phases") or {}
    lines = [
        "",
        "## Many broadcasts: what bounds them",
        "",
        "Where the immediate broadcasts that were sent spent their time, from the publication (each "
        "span from the first time one status was recorded in `control.job_history` to the next):",
        "",
        "| phase | mean s | p95 s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(p.get('mean_s'))} | {_fmt(p.get('p95_s'))} |" for name, p in phases.items()]
    slowest = slowest_phase(phases)
    lines.append("")
    if slowest is not None:
        lines.append(f"Most of it went to **{slowest}**: {PHASE_MEANING.get(slowest, slowest)}.")
    lines.append(
        "The most broadcasts between their import's start and their end at one time: "
        f"{_fmt(b.get('peak_in_flight'))} (`broadcast.lists.v1` has {_fmt(b.get('lists_partitions'))} "
        "partitions)."
    )
    cpu: dict[str, Any] = b.get("cpu_s") or {}
    if cpu:
        window = b.get("window_s")
        available = cores * window if isinstance(cores, int) and window else None
        lines.append(
            "CPU seconds of the processes from the publication to the last immediate broadcast's end: "
            + ", ".join(f"{name} {_fmt(v)}" for name, v in cpu.items())
            + (f"; the machine's {cores} cores had {_fmt(available)} in that time" if available else "")
            + " (the sandbox stands in for the ESP's own machines, and writes only the sent, "
            "delivered and bounce responses)."
        )
        if available:
            busiest = max(cpu, key=lambda name: cpu[name])
            lines.append(f"The busiest was the {busiest}: {cpu[busiest] / available:.0%} of the cores' time.")
    return lines


def _target(t: dict[str, Any]) -> str:
    """A target as the figures table shows it: with the figure's ratio to its bound, if it has one."""
    ratio = t.get("ratio")
    return f"{t['target']} ({_fmt(ratio)} of it)" if ratio is not None else str(t["target"])


def _direction(d: dict[str, Any], what: str) -> str:
    """One direction of the subscriptions part: its counts and times."""
    p95 = _fmt(d.get("p95_s"))
    if d.get("p95_is_lower_bound"):
        p95 = f"over {p95} (more than 5 % had not arrived when the wait ended)"
    return (
        f"{_fmt(d.get('arrived'))} of {_fmt(d.get('made'))} {what}; p95 {p95} s, median "
        f"{_fmt(d.get('p50_s'))} s, slowest {_fmt(d.get('max_s'))} s"
    )


def _subscriptions_figures(sync: dict[str, Any], targets: dict[str, Any]) -> str:
    """The bullet that says what the subscriptions figures are."""
    hook, crm = sync.get("webhook_to_crm", {}), sync.get("crm_to_esp", {})
    cpu: dict[str, Any] = sync.get("cpu_s") or {}

    def ratio(key: str) -> str:
        value = (targets.get(key) or {}).get("ratio")
        return f"{_fmt(value)} of the target" if value is not None else "not measured"

    return (
        "- **Subscriptions in sync**, against the sandbox ESP's MailUp flavor (its webhooks, its "
        "recipient calls, 5 calls a second) with real gatherer and syncer processes and the CRM's "
        "capture by Debezium on the Kafka Connect worker. `webhook_to_crm_p95_s`: recipients clicking "
        f"the unsubscribe link at the ESP, {float(sync.get('webhooks_per_s') or 0):g} a second, each calling "
        "MailUp's Unsubscribe webhook at the gatherer at once; the time is the syncer's own `crm_lag_s`, "
        "from the change's time at the ESP (MailUp's `EventDate`, in milliseconds) to its commit in "
        f"`crm.subscriptions`: {_direction(hook, 'arrived')} ({ratio('webhook_to_crm_p95_s')}, < 2 s; "
        "from the ESP's record of the click to the row's `updated_at`: p95 "
        f"{_fmt(hook.get('click_to_row_p95_s'))} s). `crm_to_esp_p95_s`: the CRM updating rows to "
        f"`unsubscribed`, one statement each, {float(sync.get('crm_updates_per_s') or 0):g} a second (MailUp "
        "takes 5 calls a second, an unsubscribe is 2), captured by Debezium and pushed by the syncer; "
        "the time runs from the row's `updated_at` (the statement, committed at once) to the time the "
        f"ESP's contact record changed: {_direction(crm, 'arrived')} ({ratio('crm_to_esp_p95_s')}, "
        "< 5 s). The counts are the changes that arrived. CPU seconds while they ran: "
        + (", ".join(f"{name} {_fmt(v)}" for name, v in cpu.items()) or "—")
        + "."
    )


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
        target, met = (_target(t), _fmt(t["met"])) if t else ("", "")
        lines.append(f"| `{key}` | {_fmt(results.get(key))} | {target} | {met} |")
    e2e, up, mem = details.get("e2e", {}), details.get("upload", {}), details.get("memory", {})
    many = details.get("broadcasts", {})
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
    if many:
        lines.append(_broadcasts_figures(many, results))
        lines += _broadcasts_bounds(many, machine.get("cpu_count"))
    sync = details.get("subscriptions", {})
    if sync:
        lines.append(_subscriptions_figures(sync, targets))
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
        "make bench            # full sizes: 1,000,000 events, 1,000,000 recipients, a 1 GiB response file,",
        "                      #   500 broadcasts of 2,000 recipients, 200 subscription changes each way",
        "make bench QUICK=1    # a few minutes: 200,000 events and recipients, a 100 MB response file,",
        "                      #   60 broadcasts of 500 recipients, 40 subscription changes each way",
        "```",
        "",
        "`make bench` starts the servers that are not running (`make up`), then runs `python -m bench`",
        "in its own `bench_*` database, `bench*.` topic prefix and ESP account folder, all removed at",
        "the end (the subscriptions part's capture too: its connector and replication slot). It",
        "writes bench/results/latest.json and this page; `python -m bench --help` lists the",
        "options (only some parts, other sizes, another output file): with the servers' settings",
        "sourced (`set -a; source .run/espbridge.env; set +a`), `python -m bench --only broadcasts",
        "--monitors 3` runs the many-broadcasts part alone with three monitors.",
    ]
    if sizes:
        lines += ["", "Sizes of this run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sizes.items()) + "."]
    return "\n".join(lines) + "\n"

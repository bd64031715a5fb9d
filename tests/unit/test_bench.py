"""The bench's pure parts: its generated response files are what the generic ESP's format needs
(and what the pipeline makes of them is the limit's CSV), and its results have every key."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bench import generate, report
from bench.__main__ import PARTS, Sizes, main
from bench.broadcasts import (
    SENT,
    BroadcastsPlan,
    Timeline,
    peak_overlap,
    per_minute,
    percentile,
    percentile_with_unfinished,
    plan_jobs,
    summarize,
)
from bench.subscriptions import Latencies, between, crm_lags
from services.loader.core import copy_line
from shared.esp import AccountConfig, BadRow, ConnectorContext
from shared.esp.generic import GenericConnector
from shared.model.events import fields_of
from shared.model.messages import ResponseEvent

START = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


async def parse(path: Path, remote: str) -> list[ResponseEvent | BadRow]:
    account = AccountConfig(
        esp="sandbox", account="bench-t", api_url="http://127.0.0.1:1/api", token=SecretStr("t")
    )
    async with aiohttp.ClientSession() as http:
        return list(GenericConnector(account, ConnectorContext(http)).parse_response_file(path, remote))


def loaded_fields(event: ResponseEvent) -> list[str]:
    """The first 11 columns the loader COPYs for the event (NULL as an empty CSV field)."""
    line = copy_line(fields_of(event)).decode().rstrip("\n").split("\t")
    fields = ["" if v == "\\N" else v for v in line[:11]]
    # The same instant, written as the limit CSV writes it (the bench's times are whole seconds).
    fields[9] = datetime.fromisoformat(fields[9]).strftime("%Y-%m-%dT%H:%M:%SZ")
    return fields


async def test_response_files_parse_into_the_rows_of_the_limit_csv(tmp_path: Path) -> None:
    broadcasts = generate.plan_broadcasts("t", 3000, 2, START)
    limit = io.StringIO()
    remote = "sandbox/bench-t/responses"
    files = generate.write_response_files(tmp_path, broadcasts, 7, "sandbox", "bench-t", remote, limit)
    assert {f.name.rsplit("_", 1)[1] for f in files} == {f"{p}.csv" for p in generate.PHASES}
    assert all(f.bytes == (tmp_path / f.name).stat().st_size for f in files)
    total = sum(f.rows for f in files)
    assert 2700 < total < 3300

    pipeline_rows: list[list[str]] = []
    types: Counter[str] = Counter()
    for f in files:
        parsed = await parse(tmp_path / f.name, f"{remote}/{f.name}")
        assert not [p for p in parsed if isinstance(p, BadRow)], f"{f.name} has rows the connector refuses"
        events = [p for p in parsed if isinstance(p, ResponseEvent)]
        assert len(events) == f.rows
        types.update(e.type.value for e in events)
        assert {e.broadcast_id for e in events} == {f.broadcast_id}
        pipeline_rows += [loaded_fields(e) for e in events]
    # Every type of the funnel is there; the limit CSV holds what the loader would insert.
    assert set(types) >= {"sent", "delivered", "bounce_hard", "bounce_soft", "open", "click", "unsubscribe"}
    assert types["sent"] == sum(b.recipients for b in broadcasts)
    assert list(csv.reader(io.StringIO(limit.getvalue()))) == pipeline_rows
    assert len(generate.LIMIT_COLUMNS) == 11


def test_generated_data_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broadcasts = generate.plan_broadcasts("t", 500, 1, START)
    for d in ("a", "b"):
        generate.write_response_files(tmp_path / d, broadcasts, 1, "sandbox", "x", "r")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


async def test_the_large_clicks_file_is_valid_and_as_large_as_asked(tmp_path: Path) -> None:
    b = generate.plan_broadcasts("t", 1000, 1, START)[0]
    made = generate.write_clicks_file(tmp_path / "big.csv", b, 300_000, 1)
    assert made.bytes >= 300_000
    parsed = await parse(tmp_path / "big.csv", "sandbox/bench-t/responses/big.csv")
    assert len(parsed) == made.rows
    assert all(isinstance(p, ResponseEvent) and p.type.value == "click" for p in parsed)
    assert made.bytes / made.rows > 600, "the memory bench's rows carry long tracking links"


def test_the_customers_seeded_for_a_selection_leave_it_after_the_opt_outs() -> None:
    for selected in (1, 32, 33, 1000, 200_000, 1_000_000):
        total = generate.customers_for(selected)
        assert total - total // 33 == selected  # seed_customers opts out every 33rd


def full_results() -> dict[str, Any]:
    results: dict[str, Any] = dict.fromkeys(report.KEYS, 1.0)
    results |= {
        "e2e_ratio": 0.5,
        "upload_ratio": 2.0,
        "gatherer_peak_rss_mb": 120.0,
        "loader_peak_rss_mb": None,
        "scale": {report.scale_key(1, 1): 1000, report.scale_key(2, 1): 1500},
        "machine": {"cpu_count": 2},
        "date": "2026-11-22T10:00:00+00:00",
        "git_commit": "abc",
        "quick": True,
    }
    results["targets"] = report.judge(results)
    return results


def test_results_have_every_key_and_targets_are_judged() -> None:
    results = full_results()
    assert report.missing_keys(results) == []
    assert report.missing_keys({"e2e_ratio": 1}) != []
    t = results["targets"]
    assert (t["e2e_ratio"]["met"], t["upload_ratio"]["met"], t["gatherer_peak_rss_mb"]["met"]) == (
        True,
        False,
        True,
    )
    assert t["loader_peak_rss_mb"]["met"] is None


def test_the_page_shows_every_figure_and_the_scale_table() -> None:
    page = report.render_markdown(full_results())
    for key in report.KEYS:
        if key != "scale":
            assert f"`{key}`" in page
    assert "| 2 | 1 | 1,500 | 1.50 x |" in page
    assert "QUICK" in page
    assert "make bench QUICK=1" in page


def test_profile_summary_counts_own_and_inclusive_samples() -> None:
    raw = (
        "<module> (services/loader/__main__.py:5);handle_batch (services/loader/handlers.py:30);"
        "model_validate_json (pydantic/main.py:700) 30\n"
        "<module> (services/loader/__main__.py:5);handle_batch (services/loader/handlers.py:31);"
        "load (services/loader/store.py:60) 10\n"
        "<module> (services/loader/__main__.py:5);select (selectors.py:468) 60\n"
    )
    summary = report.summarize_profile(raw)
    assert summary["samples"] == 100
    assert summary["own"][0] == {"function": "select (selectors.py)", "samples": 60, "pct": 60.0}
    inclusive = {e["function"]: e["pct"] for e in summary["inclusive"]}
    assert inclusive == {
        "handle_batch (services/loader/handlers.py)": 40.0,
        "load (services/loader/store.py)": 10.0,
    }
    areas = {a["area"]: a["pct"] for a in summary["areas"]}
    assert areas == {"selectors": 60.0, "pydantic": 30.0, "services/loader": 10.0}


@pytest.mark.parametrize("rounds", ["0", "-2", "three"])
def test_rounds_below_one_are_refused_with_a_clear_error(
    rounds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--rounds", rounds])
    assert exited.value.code == 2  # argparse's usage error, before anything is measured
    assert "--rounds" in capsys.readouterr().err


def test_the_issue_sizes_the_many_broadcasts_part_and_quick_shrinks_it() -> None:
    full, quick = Sizes.for_run(quick=False), Sizes.for_run(quick=True)
    assert (full.broadcasts, full.broadcast_recipients) == (500, 2000)
    assert (quick.broadcasts, quick.broadcast_recipients) == (60, 500)
    assert BroadcastsPlan(full.broadcasts, full.broadcast_recipients).scheduled == 50
    assert BroadcastsPlan(quick.broadcasts, quick.broadcast_recipients).scheduled == 6


def test_every_tenth_job_is_scheduled_ahead_to_the_whole_second() -> None:
    now = START + timedelta(microseconds=250_000)
    jobs, timelines = plan_jobs("t", "bench-t", BroadcastsPlan(20, 10), now)
    due = START + timedelta(seconds=121)  # 120 s ahead, rounded up
    assert [j.send_at for j in jobs] == [due if i in (9, 19) else None for i in range(20)]
    assert len({j.job_id for j in jobs}) == len({j.list_name for j in jobs}) == 20
    assert [t.send_at for t in timelines.values()] == [j.send_at for j in jobs]


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([float(v) for v in range(20, 0, -1)], 95, 19.0),  # nearest rank: the 19th of 20, in order
        ([float(v) for v in range(1, 101)], 95, 95.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([7.0], 95, 7.0),
        ([], 95, None),
    ],
)
def test_a_percentile_is_the_nearest_rank_value(
    values: list[float], pct: float, expected: float | None
) -> None:
    assert percentile(values, pct) == expected


def test_broadcasts_not_sent_yet_make_the_p95_a_lower_bound() -> None:
    sent = [float(v) for v in range(1, 20)]
    assert percentile_with_unfinished(sent, 1, 300.0) == (19.0, False)  # the 19th of 20 was sent
    assert percentile_with_unfinished(sent, 2, 300.0) == (300.0, True)  # the 20th of 21 is not sent yet
    assert percentile_with_unfinished([], 0, 300.0) == (None, False)


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def sent_broadcast(n: int, seconds: float) -> Timeline:
    """An immediate broadcast through every stage, sent ``seconds`` after START."""
    stages = {
        "upload/running": 1,
        "upload/done": 2,
        "import/running": seconds - 3,
        "import/done": seconds - 1,
    }
    first = {k: at(v) for k, v in stages.items()} | {SENT: at(seconds)}
    return Timeline(f"b{n}", None, first, sent_at=at(seconds))


def test_the_rate_counts_the_immediate_broadcasts_from_publication_to_the_last_sent() -> None:
    immediate = [sent_broadcast(n, 10.0 * n) for n in range(1, 10)]  # sent at 10, 20 … 90 s
    scheduled = Timeline("s", at(120), {SENT: at(125)}, sent_at=at(125))
    figures = summarize([*immediate, scheduled], START, ended_at=at(126))
    assert figures["broadcasts_per_min"] == 6.0  # 9 in 90 s; the scheduled one, later, not counted
    assert figures["window_s"] == 90.0
    assert figures["publish_to_sent_p95_s"] == 90.0  # the 9th of 9
    assert figures["publish_to_sent_p50_s"] == 50.0
    assert figures["scheduled_late_p95_s"] == 5.0
    assert (figures["immediate_sent"], figures["scheduled_sent"], figures["timed_out"]) == (9, 1, False)
    assert figures["phases"]["waiting for an uploader"] == {"mean_s": 1.0, "p95_s": 1.0}
    assert figures["phases"]["send"] == {"mean_s": 1.0, "p95_s": 1.0}
    assert figures["phases"]["waiting for a monitor"]["mean_s"] == 45.0  # (7 + 17 … + 87) / 9


def test_a_timeout_reports_what_finished_by_then() -> None:
    timelines = [sent_broadcast(n, 10.0 * n) for n in range(1, 7)]  # 6 sent by 60 s
    timelines += [Timeline(f"r{n}", None, {"import/running": at(50)}) for n in range(3)]
    timelines.append(
        Timeline(
            "f",
            None,
            {"import/failed": at(5)},
            unsent="import/failed: line 2: invalid email",
            unsent_at=at(5),
        )
    )
    timelines.append(Timeline("s", at(120), {"import/done": at(30)}))
    figures = summarize(timelines, START, ended_at=at(180))
    assert figures["broadcasts_per_min"] == 2.0  # 6 sent in the 3 minutes waited
    assert (figures["publish_to_sent_p95_s"], figures["publish_to_sent_p95_is_lower_bound"]) == (180.0, True)
    assert (figures["scheduled_late_p95_s"], figures["scheduled_late_p95_is_lower_bound"]) == (60.0, True)
    assert figures["timed_out"] is True
    assert (figures["immediate_running"], figures["immediate_unsent"], figures["scheduled_running"]) == (
        3,
        1,
        1,
    )
    assert figures["unsent_reasons"] == ["import/failed: line 2: invalid email"]


def test_in_flight_counts_the_broadcasts_between_import_and_end_at_one_instant() -> None:
    assert peak_overlap([(at(0), at(10)), (at(5), at(15)), (at(10), at(20))]) == 2
    assert peak_overlap([(at(0), at(10)), (at(10), at(20)), (at(20), at(30))]) == 1
    assert peak_overlap([]) == 0
    three = [sent_broadcast(n, 10.0) for n in range(3)]  # all three between 7 s and 10 s
    assert summarize(three, START, at(10))["peak_in_flight"] == 3
    assert per_minute(0, 0.0) == 0.0


def broadcasts_results(timed_out: bool) -> dict[str, Any]:
    figures = summarize([sent_broadcast(n, 10.0 * n) for n in range(1, 10)], START, at(90))
    results = full_results()
    for key in ("broadcasts_per_min", "publish_to_sent_p95_s", "scheduled_late_p95_s"):
        results[key] = figures.pop(key)
    results["details"] = {
        "broadcasts": {
            **vars(BroadcastsPlan(9, 100)),
            **figures,
            "timed_out": timed_out,
            "cpu_s": {"uploader": 4.0, "monitor": 9.5, "sandbox": 3.0},
            "lists_partitions": 3,
        }
    }
    results["targets"] = report.judge(results)
    return results


def test_the_page_says_what_bounds_the_many_broadcasts_against_the_issues_target() -> None:
    results = broadcasts_results(timed_out=False)
    assert results["targets"]["broadcasts_per_min"] == {"target": ">= 90", "value": 6.0, "met": False}
    page = report.render_markdown(results)
    assert "| `broadcasts_per_min` | 6.00 | >= 90 | no |" in page
    assert "the 450 immediate broadcasts all sent within 5 minutes of publication" in page
    assert "| waiting for a monitor | 45.00 | 85.00 |" in page
    assert "Most of it went to **waiting for a monitor**" in page
    assert "`broadcast.lists.v1` has 3 partitions" in page
    assert "monitor 9.50" in page
    assert "The busiest was the monitor: 5% of the cores' time." in page
    assert "the machine's 2 cores had 180" in page  # 2 cores for the 90 s to the last immediate one
    assert "stopped at its timeout" not in page
    assert "stopped at its timeout" in report.render_markdown(broadcasts_results(timed_out=True))
    assert report.slowest_phase({}) is None


def test_the_subscriptions_part_makes_200_changes_each_way_and_quick_40() -> None:
    assert (Sizes.for_run(quick=False).sync_changes, Sizes.for_run(quick=True).sync_changes) == (200, 40)
    assert "subscriptions" in PARTS


def test_changes_that_did_not_arrive_make_the_p95_a_lower_bound() -> None:
    all_in = Latencies(20, [0.1 * n for n in range(1, 21)], waited_s=120.0).figures()
    assert (all_in["arrived"], all_in["p95_s"], all_in["p95_is_lower_bound"]) == (20, 1.9, False)
    assert (all_in["p50_s"], all_in["max_s"]) == (1.0, 2.0)
    two_missing = Latencies(20, [0.5] * 18, waited_s=120.0).figures()
    assert (two_missing["arrived"], two_missing["p95_s"], two_missing["p95_is_lower_bound"]) == (
        18,
        120.0,
        True,
    )
    assert Latencies(5, [], 30.0).figures()["max_s"] is None


def test_a_change_counts_only_when_both_its_ends_were_seen() -> None:
    assert between({"a": 10.0, "b": 11.0, "c": 12.0}, {"a": 10.25, "c": 13.5}) == [0.25, 1.5]


def test_the_webhook_figure_is_the_syncers_crm_lag_of_each_unsubscribe_it_committed(tmp_path: Path) -> None:
    log = tmp_path / "syncer.log"
    applied = {"msg": "subscription change applied", "esp": "mailup", "state": "unsubscribed"}
    log.write_text(
        "\n".join(
            [
                json.dumps(applied | {"crm_lag_s": 0.04}),
                json.dumps(applied | {"state": "subscribed", "crm_lag_s": 9.0}),  # not an unsubscribe
                json.dumps({"msg": "service ready"}),
                "a line that is not JSON: subscription change applied",
                json.dumps(applied | {"crm_lag_s": 0.125}),
            ]
        )
    )
    assert crm_lags(log) == [0.04, 0.125]


def subscriptions_results(webhook_p95: float | None, crm_p95: float | None) -> dict[str, Any]:
    results = full_results()
    results |= {
        "webhook_to_crm_p95_s": webhook_p95,
        "webhook_to_crm_count": 200,
        "crm_to_esp_p95_s": crm_p95,
        "crm_to_esp_count": 189,
    }
    results["details"] = {
        "subscriptions": {
            "webhook_to_crm": Latencies(200, [0.05] * 200, 120.0).figures() | {"click_to_row_p95_s": 0.06},
            "crm_to_esp": Latencies(200, [0.5] * 189, 120.0).figures(),  # the 190th is the p95's
            "webhooks_per_s": 10.0,
            "crm_updates_per_s": 1.5,
            "cpu_s": {"sandbox": 1.5, "gatherer": 0.5, "syncer": 3.0},
        }
    }
    results["targets"] = report.judge(results)
    return results


def test_the_sync_times_are_judged_under_their_bounds_and_shown_as_ratios_of_them() -> None:
    results = subscriptions_results(webhook_p95=0.5, crm_p95=5.0)
    targets = results["targets"]
    assert targets["webhook_to_crm_p95_s"] == {"target": "< 2", "value": 0.5, "met": True, "ratio": 0.25}
    assert targets["crm_to_esp_p95_s"] == {"target": "< 5", "value": 5.0, "met": False, "ratio": 1.0}
    page = report.render_markdown(results)
    assert "| `webhook_to_crm_p95_s` | 0.500 | < 2 (0.250 of it) | yes |" in page
    assert "| `crm_to_esp_p95_s` | 5.00 | < 5 (1.00 of it) | no |" in page
    assert "| `crm_to_esp_count` | 189 |  |  |" in page
    assert "clicking the unsubscribe link at the ESP, 10 a second" in page
    assert "one statement each, 1.5 a second" in page
    assert "189 of 200 arrived; p95 over 120 (more than 5 % had not arrived" in page
    assert "syncer 3.00" in page
    unmeasured = report.judge(subscriptions_results(None, None))
    assert unmeasured["webhook_to_crm_p95_s"] == {"target": "< 2", "value": None, "met": None, "ratio": None}

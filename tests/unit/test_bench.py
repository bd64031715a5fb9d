"""The bench's pure parts: its generated response files are what the generic ESP's format needs
(and what the pipeline makes of them is the limit's CSV), and its results have every key."""

from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bench import generate, report
from bench.__main__ import main
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

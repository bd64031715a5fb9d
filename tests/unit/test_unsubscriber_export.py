"""The unsubscriber export's rules without a server: each period's file name and the changes it
holds (the previous day in the export's own time zone), the list filters an operator types, the
syncer's export settings, and the one-line errors of ``espbridge subscriptions export``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from cli.main import main
from shared.infra.db.unsubscribers import ListPattern
from shared.operations.exporting import ExportSettings, Period, parse_list_pattern, period_file

ROME = ZoneInfo("Europe/Rome")


def test_the_previous_day_is_the_day_before_in_the_exports_time_zone() -> None:
    at = datetime(2026, 12, 7, 23, 30, tzinfo=UTC)  # already 00:30 on the 8th in Rome

    rome, utc = (
        period_file(Period.PREVIOUS_DAY, at, ROME),
        period_file(Period.PREVIOUS_DAY, at, ZoneInfo("UTC")),
    )

    assert rome.name == "unsubscribers_2026-12-07.csv"
    assert (rome.changed_from, rome.changed_before) == (
        datetime(2026, 12, 6, 23, 0, tzinfo=UTC),
        datetime(2026, 12, 7, 23, 0, tzinfo=UTC),
    )
    assert utc.name == "unsubscribers_2026-12-06.csv"  # still the 7th in UTC
    assert (utc.changed_from, utc.changed_before) == (
        datetime(2026, 12, 6, tzinfo=UTC),
        datetime(2026, 12, 7, tzinfo=UTC),
    )


def test_the_previous_day_of_a_clock_change_is_23_hours_long() -> None:
    file = period_file(Period.PREVIOUS_DAY, datetime(2026, 3, 30, 8, tzinfo=UTC), ROME)

    assert file.name == "unsubscribers_2026-03-29.csv"
    assert file.changed_from is not None
    assert file.changed_before is not None
    assert (file.changed_before - file.changed_from).total_seconds() == 23 * 3600


def test_an_export_of_everything_is_named_by_its_time_in_utc_and_has_no_bounds() -> None:
    file = period_file(Period.ALL, datetime(2026, 12, 8, 7, 5, 9, tzinfo=ROME), ROME)

    assert (file.name, file.changed_from, file.changed_before) == (
        "unsubscribers_all_20261208T060509Z.csv",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("mailup/acme/12", ListPattern("mailup", "acme", "12")),
        ("optimizely/shop/*", ListPattern("optimizely", "shop", "*")),
        (" mailup/acme/news-letter.v2 ", ListPattern("mailup", "acme", "news-letter.v2")),
    ],
)
def test_a_list_filter_is_esp_account_and_list_or_every_list(text: str, pattern: ListPattern) -> None:
    assert parse_list_pattern(text) == pattern


@pytest.mark.parametrize(
    "text", ["mailup/acme", "mailup/acme/12/3", "mailup//12", "MailUp/acme/12", "mailup/acme/a b", "*/*/*"]
)
def test_a_malformed_list_filter_is_refused_with_what_it_should_be(text: str) -> None:
    with pytest.raises(ValueError, match="list filter"):
        parse_list_pattern(text)


def test_the_export_settings_take_comma_separated_lists_and_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPBRIDGE_SYNCER_EXPORT_SCHEDULE", "0 6 * * *")
    monkeypatch.setenv("ESPBRIDGE_SYNCER_EXPORT_DIR", "/srv/crm/in")
    monkeypatch.setenv("ESPBRIDGE_SYNCER_EXPORT_INCLUDE_LISTS", "mailup/acme/*, optimizely/shop/7")
    monkeypatch.setenv("ESPBRIDGE_SYNCER_EXPORT_EXCLUDE_REASONS", "bounce_hard")
    monkeypatch.setenv("ESPBRIDGE_SYNCER_EXPORT_TIME_ZONE", "Europe/Rome")

    settings = ExportSettings()
    export = settings.export()

    assert settings.enabled
    assert export.folder == Path("/srv/crm/in")
    assert export.period is Period.PREVIOUS_DAY
    assert export.zone == ROME
    assert export.include_lists == (
        ListPattern("mailup", "acme", "*"),
        ListPattern("optimizely", "shop", "7"),
    )
    assert export.exclude_reasons == ("bounce_hard",)


def test_without_settings_nothing_is_scheduled() -> None:
    assert not ExportSettings().enabled


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (
            {"schedule": "0 6 * * *"},
            "needs both ESPBRIDGE_SYNCER_EXPORT_SCHEDULE and ESPBRIDGE_SYNCER_EXPORT_DIR",
        ),
        ({"dir": "/srv/crm/in"}, "needs both"),
        ({"schedule": "at six", "dir": "/srv"}, "'at six' is not a cron expression"),
        ({"time_zone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"exclude_lists": "mailup/acme"}, "list filter 'mailup/acme' is not esp/account/list"),
    ],
)
def test_bad_export_settings_are_refused_at_start(settings: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        ExportSettings.model_validate(settings)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--include-list", "mailup/acme"],
            "list filter 'mailup/acme' is not esp/account/list or esp/account/*",
        ),
        (["--exclude-list", "mailup/acme/ok,bad"], "list filter 'bad' is not esp/account/list"),
        (["--time-zone", "Nowhere/At_All"], "unknown time zone 'Nowhere/At_All'"),
        ([], "give the folder to write into: --dir (or ESPBRIDGE_SYNCER_EXPORT_DIR)"),
    ],
)
def test_a_bad_export_command_is_one_line_and_exit_2(
    flags: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("ESPBRIDGE_SYNCER_EXPORT_DIR", raising=False)
    folder = [] if not flags else ["--dir", str(tmp_path)]

    code = main(["subscriptions", "export", *folder, *flags])

    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"espbridge: {err.removeprefix('espbridge: ').strip()}"]
    assert says in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["not-an-email", "--esp", "mailup", "--account", "acme", "--unsubscribe"], "email"),
        (["a@example.com", "--esp", "MailUp", "--account", "acme", "--unsubscribe"], "esp"),
        (["a@example.com", "--esp", "mailup", "--account", "acme"], "needs a state, fields, or both"),
        (
            ["a@example.com", "--esp", "mailup", "--account", "acme", "--field", "City"],
            "--field wants NAME=VALUE",
        ),
    ],
)
def test_a_bad_subscription_request_is_refused_before_anything_is_published(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # never reached

    code = main(["subscriptions", "request", *args])

    assert code == 2
    assert says in capsys.readouterr().err


def test_an_export_into_a_missing_folder_is_one_line_and_exit_1_before_the_crm_is_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ESPBRIDGE_PG_HOST", "192.0.2.1")  # a test address: never reached

    code = main(["subscriptions", "export", "--dir", str(tmp_path / "nowhere")])

    assert (code, capsys.readouterr().err) == (
        1,
        f"espbridge: the export folder {tmp_path / 'nowhere'} does not exist\n",
    )

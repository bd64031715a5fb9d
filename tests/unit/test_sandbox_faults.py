"""The sandbox's fault rules (``ESPBRIDGE_SANDBOX_FAULTS``): how they are read and which requests
they break."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from sandbox.__main__ import main
from sandbox.faults import FaultKind, FaultRule, Faults, When
from sandbox.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Settings]:
    """The sandbox settings with ``ESPBRIDGE_SANDBOX_FAULTS`` set to the text given."""

    def read(faults: str) -> Settings:
        monkeypatch.setenv("ESPBRIDGE_SANDBOX_FAULTS", faults)
        return Settings(root=tmp_path, token=SecretStr("t"))

    return read


def test_rules_are_read_from_json(tmp_path: Path, settings: Callable[[str], Settings]) -> None:
    rules = [
        {"path": "/sends$", "fault": 429, "method": "post", "when": "after", "times": 2, "skip": 1},
        {"path": "/imports", "fault": "reset"},
    ]
    parsed = settings(json.dumps(rules)).faults
    assert parsed[0] == FaultRule(
        path="/sends$", fault=FaultKind.TOO_MANY, method="POST", when=When.AFTER, times=2, skip=1
    )
    assert (parsed[1].fault, parsed[1].method, parsed[1].when, parsed[1].times) == (
        FaultKind.RESET,
        "*",
        When.BEFORE,
        1,
    )
    assert parsed[1].delay_s == 30.0
    assert settings("").faults == ()
    assert settings('[{"path": "^/rest/", "fault": "timeout", "delay_s": 5}]').faults[0].delay_s == 5.0


def test_no_rules_by_default(tmp_path: Path) -> None:
    assert Settings(root=tmp_path, token=SecretStr("t")).faults == ()


@pytest.mark.parametrize(
    ("faults", "problem"),
    [
        ("[{'path': 'x'}]", "not valid JSON"),
        ('{"path": "x", "fault": "500"}', "must be a JSON list"),
        ('[{"path": "x", "fault": "418"}]', "fault"),
        ('[{"path": "x", "fault": "500", "when": "during"}]', "when"),
        ('[{"path": "(", "fault": "500"}]', "not a regular expression"),
        ('[{"path": "x", "fault": "500", "times": 0}]', "times"),
        ('[{"path": "x", "fault": "500", "method": "GET /x"}]', "HTTP method"),
        ('[{"path": "x", "fault": "500", "tiems": 2}]', "tiems"),
        ('[{"fault": "500"}]', "path"),
    ],
)
def test_bad_rules_are_clear_errors(settings: Callable[[str], Settings], faults: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        settings(faults)


def test_bad_json_stops_the_sandbox_with_the_setting_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ESPBRIDGE_SANDBOX_ROOT", str(tmp_path))
    monkeypatch.setenv("ESPBRIDGE_SANDBOX_TOKEN", "t")
    monkeypatch.setenv("ESPBRIDGE_SANDBOX_FAULTS", "[{path: 1}")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "ESPBRIDGE_SANDBOX_FAULTS" in err
    assert "not valid JSON" in err


def test_skip_then_times() -> None:
    faults = Faults([FaultRule(path="/sends$", fault=FaultKind.ERROR, method="POST", skip=1, times=2)])
    picks = [faults.pick("POST", "/api/v1/accounts/a/sends") for _ in range(5)]
    assert picks == [None, 0, 0, None, None]
    assert faults.pick("GET", "/api/v1/accounts/a/sends") is None  # another method
    assert faults.pick("POST", "/api/v1/accounts/a/sends/x") is None  # the pattern is searched as given
    assert (faults.matched, faults.fired) == ([5], [2])


def test_every_matching_rule_counts_and_the_first_due_one_fires() -> None:
    faults = Faults(
        [
            FaultRule(path="/imports", fault=FaultKind.TOO_MANY),
            FaultRule(path="/imports/", fault=FaultKind.RESET, times=3),
        ]
    )
    assert [faults.pick("GET", "/imports/1") for _ in range(5)] == [0, 1, 1, 1, None]
    report = faults.report()
    assert [(r["matched"], r["fired"]) for r in report] == [(5, 1), (5, 3)]
    assert report[0]["fault"] == "429"


def test_test_support_paths_never_get_faults() -> None:
    faults = Faults([FaultRule(path=".", fault=FaultKind.UNAVAILABLE, times=100)])
    for path in ("/healthz", "/_sandbox/faults", "/api/v1/accounts/a/_sandbox/stats", "/rest/_sandbox/stats"):
        assert faults.pick("GET", path) is None, path
    assert faults.matched == [0]
    assert faults.pick("GET", "/rest/emails/send_status") == 0

"""Failpoints: armed from settings, hold at the first arrival until SIGUSR1, pass once marked."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.runtime.failpoints import Failpoints, FailpointSettings, Point


def test_settings_read_a_comma_list_of_known_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESPBRIDGE_FAILPOINTS", "loader.after_db_commit, uploader.mid_upload")
    monkeypatch.setenv("ESPBRIDGE_FAILPOINT_DIR", str(tmp_path))
    settings = FailpointSettings()
    assert settings.failpoints == {Point.LOADER_AFTER_DB_COMMIT, Point.UPLOADER_MID_UPLOAD}
    assert FailpointSettings.model_construct().failpoints == frozenset()
    with pytest.raises(ValidationError):
        FailpointSettings.model_validate({"failpoints": "loader.typo", "failpoint_dir": tmp_path})
    with pytest.raises(ValidationError, match="needs ESPBRIDGE_FAILPOINT_DIR"):
        FailpointSettings.model_validate({"failpoints": "loader.after_db_commit", "failpoint_dir": None})


async def test_an_armed_point_marks_and_holds_until_sigusr1(tmp_path: Path) -> None:
    points = Failpoints(
        FailpointSettings.model_validate({"failpoints": "gatherer.mid_file", "failpoint_dir": tmp_path})
    )
    await points.reach(Point.LOADER_AFTER_DB_COMMIT)  # not armed: passes at once
    held = asyncio.create_task(points.reach(Point.GATHERER_MID_FILE))
    marker = tmp_path / "gatherer.mid_file"
    await asyncio.sleep(0)  # the task runs up to its hold: the marker is written before it waits
    assert marker.read_text() == f"{os.getpid()}\n"
    assert not held.done()
    os.kill(os.getpid(), signal.SIGUSR1)
    await asyncio.wait_for(held, 5)
    asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)


async def test_a_point_marked_by_an_earlier_process_is_passed(tmp_path: Path) -> None:
    (tmp_path / "monitor.after_send").write_text("1\n")
    points = Failpoints(
        FailpointSettings.model_validate({"failpoints": "monitor.after_send", "failpoint_dir": tmp_path})
    )
    await asyncio.wait_for(points.reach(Point.MONITOR_AFTER_SEND), 1)

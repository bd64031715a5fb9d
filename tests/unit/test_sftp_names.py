"""Remote names never become unsafe local paths or escape a remote folder."""

from __future__ import annotations

import pytest

from shared.infra.sftp import is_partial_upload, partial_upload_name, remote_join, safe_local_name
from shared.model.errors import PermanentError


@pytest.mark.parametrize(
    "remote", ["../../x.csv", "/etc/passwd", "..", "a/../../b", "C:\\Windows\\x.csv", "\x00evil", ""]
)
def test_safe_local_name_is_a_plain_file_name(remote: str) -> None:
    name = safe_local_name(remote)
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert name not in {"", ".", ".."}
    assert not name.startswith(".")


def test_safe_local_names_keep_the_readable_part_and_differ_per_path() -> None:
    a = safe_local_name("responses/opens 2026-11-22.csv")
    b = safe_local_name("archive/opens 2026-11-22.csv")
    assert a.endswith("opens_2026-11-22.csv")
    assert a != b


@pytest.mark.parametrize("name", ["../x.csv", "a/b.csv", "..", ".", "", "a\\b", "x\x00"])
def test_remote_join_refuses_names_that_leave_the_folder(name: str) -> None:
    with pytest.raises(PermanentError, match="unsafe remote file name"):
        remote_join("sandbox/demo/responses", name)


def test_remote_join_joins_plain_names() -> None:
    assert remote_join("sandbox/demo/drop", "list.csv") == "sandbox/demo/drop/list.csv"


def test_an_uploads_temporary_name_is_hidden_beside_its_target_and_known_as_ours() -> None:
    tmp = partial_upload_name("sandbox/demo/drop/job-1.csv")
    folder, name = tmp.rsplit("/", 1)
    assert folder == "sandbox/demo/drop"
    assert name.startswith(".job-1.csv.")
    assert is_partial_upload(name)


@pytest.mark.parametrize(
    "name",
    [
        ".job-1.csv.partial",  # no random tag
        ".job-1.csv.0123456789AB.partial",  # the tag is lower-case hex
        ".job-1.csv.0123456789a.partial",  # eleven digits
        ".job-1.csv.0123456789ab.partial.bak",
        "job-1.csv.0123456789ab.partial",  # not hidden
        "..0123456789ab.partial",  # no target name
        ".job-1.csv",
    ],
)
def test_a_name_not_exactly_of_the_uploaders_form_is_someone_elses(name: str) -> None:
    assert not is_partial_upload(name)

"""Files an operator writes (the ESP accounts, a job file) are JSON or YAML by their name, and one
that does not parse says which it was meant to be and why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.jobs import read_job_file
from shared.esp import Accounts, AccountsSettings
from shared.infra.documents import DocumentError, read_document
from shared.model.errors import ConfigurationError, InvalidMessageError


def test_a_json_file_is_read_as_json_and_any_other_as_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"esp": "sandbox", "rows": [1, 2]}')
    (tmp_path / "a.yaml").write_text("esp: sandbox\nrows: [1, 2]\n")
    (tmp_path / "a.txt").write_text("esp: sandbox\n")
    assert read_document(tmp_path / "a.json") == {"esp": "sandbox", "rows": [1, 2]}
    assert read_document(tmp_path / "a.yaml") == {"esp": "sandbox", "rows": [1, 2]}
    assert read_document(tmp_path / "a.txt") == {"esp": "sandbox"}


@pytest.mark.parametrize(
    ("name", "text", "form"), [("a.json", "esp: sandbox", "JSON"), ("a.yml", "[1, 2", "YAML")]
)
def test_a_file_that_does_not_parse_names_its_form(tmp_path: Path, name: str, text: str, form: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DocumentError) as caught:
        read_document(tmp_path / name)
    assert caught.value.form == form
    with pytest.raises(InvalidMessageError, match=f"is not valid {form}: "):
        read_job_file(tmp_path / name)
    with pytest.raises(
        ConfigurationError, match=re.escape(f"accounts file {tmp_path / name} is invalid: {caught.value}")
    ):
        Accounts.load(AccountsSettings(accounts_file=tmp_path / name))


def test_a_missing_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_document(tmp_path / "missing.json")
    with pytest.raises(
        ConfigurationError, match=re.escape(f"cannot read {tmp_path / 'missing.json'}: No such file")
    ):
        read_job_file(tmp_path / "missing.json")


def test_a_job_file_holds_one_mapping(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("- one\n- two\n")
    with pytest.raises(InvalidMessageError, match="must hold one job"):
        read_job_file(tmp_path / "job.yaml")

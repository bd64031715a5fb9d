"""The contracts for producers: the committed AsyncAPI document and JSON Schemas are the code's, valid,
and usable on their own; ``espbridge schema`` and ``espbridge job validate`` work without a server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cli import main as cli_main
from cli.schema import WRITE_COMMAND, contract_files
from shared.model.contracts import TRAFFIC, message_models, topic_descriptions
from shared.model.topics import REGISTRY, Topic
from tests.fixtures.servers import ROOT
from tests.unit.test_messages import examples

DOCS = ROOT / "docs"
ASYNCAPI_SPEC = ROOT / "tests" / "contracts" / "asyncapi-3.0.0.schema.json"


@pytest.mark.parametrize("relative", sorted(contract_files()))
def test_a_committed_contract_file_is_what_the_code_makes(relative: str) -> None:
    committed = DOCS / relative
    assert committed.is_file(), f"docs/{relative} is missing: run `{WRITE_COMMAND}`"
    assert committed.read_text(encoding="utf-8") == contract_files()[relative], (
        f"docs/{relative} has drifted from the code: run `{WRITE_COMMAND}` and commit it"
    )


def test_no_schema_file_is_left_of_a_message_that_is_gone() -> None:
    committed = {f"schemas/{p.name}" for p in (DOCS / "schemas").glob("*.schema.json")}
    assert committed == {r for r in contract_files() if r.startswith("schemas/")}, f"run `{WRITE_COMMAND}`"


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    spec = json.loads(ASYNCAPI_SPEC.read_text(encoding="utf-8"))
    document = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(spec).iter_errors(document)]
    assert errors == []


def test_the_asyncapi_document_has_every_topic_with_its_message_key_and_parties() -> None:
    document = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    channels = document["channels"]
    assert sorted(c["address"] for c in channels.values()) == sorted(t.value for t in Topic)
    jobs = channels["broadcast_jobs"]
    assert jobs["description"].startswith("Broadcast jobs to run, from a CRM")
    assert list(jobs["messages"]) == ["BroadcastJob"]
    message = document["components"]["messages"]["BroadcastJob"]
    assert message["bindings"]["kafka"]["key"]["description"] == "Keyed by the job_id."
    uploader = document["operations"]["uploader_receive_broadcast_jobs"]
    assert (uploader["action"], uploader["channel"]) == ("receive", {"$ref": "#/channels/broadcast_jobs"})
    assert "producers_send_broadcast_jobs" in document["operations"]


def test_every_topic_has_its_parties_and_description() -> None:
    assert set(TRAFFIC) == set(Topic)
    assert set(topic_descriptions()) == {t.name for t in Topic}
    assert all(t.senders and t.receivers for t in TRAFFIC.values())


def test_the_readme_table_of_what_each_service_consumes_agrees_with_the_parties() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for service, consumes in re.findall(r"^\| (\w+) \| ((?:`[\w.]+`(?:, )?)+) \|", readme, re.MULTILINE):
        listed = set(re.findall(r"`([\w.]+)`", consumes))
        assert listed == {t.value for t, p in TRAFFIC.items() if service in p.receivers}, service


@pytest.mark.parametrize("name", sorted(message_models()))
def test_each_schema_file_stands_alone_as_draft_2020_12(name: str) -> None:
    schema = json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert (schema["$id"], schema["title"]) == (f"urn:espbridge:message:{name}", name)
    assert schema["description"]
    refs = re.findall(r'"\$ref": "([^"]*)"', json.dumps(schema))
    assert [r for r in refs if not r.startswith("#/$defs/")] == []


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_a_message_espbridge_writes_is_valid_against_its_committed_schema(message: Any) -> None:
    name = type(message).__name__
    schema = json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(json.loads(message.to_json()))


def test_schema_lists_every_message_with_its_topic(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [s.model.__name__, s.topic.value] for s in REGISTRY.values()
    ]


def test_schema_of_a_message_prints_its_committed_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["schema", "CancelRequest"]) == 0
    assert capsys.readouterr().out == (DOCS / "schemas" / "CancelRequest.schema.json").read_text()


def test_schema_of_an_unknown_message_exits_2_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main.main(["schema", "Newsletter"]) == 2
    err = capsys.readouterr().err
    assert "unknown message 'Newsletter'" in err
    assert "BroadcastJob" in err
    assert "DeadLetter" in err


def test_schema_write_writes_every_file(tmp_path: Path) -> None:
    assert cli_main.main(["schema", "--write", str(tmp_path)]) == 0
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == set(contract_files())


VALID_JOB = """\
esp: sandbox
account: demo
list_name: November newsletter
message: msg-42
selection:
  kind: table
  table: crm.customers
  columns: [email, first_name, communication_key]
field_map:
  email: EmailAddress
communication_key: communication_key
"""


def _validate(tmp_path: Path, name: str, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    code = cli_main.main(["job", "validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_valid_job_file_validates_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _validate(tmp_path, "job.yaml", VALID_JOB, capsys)
    assert (code, "valid" in out) == (0, True)


def test_an_invalid_job_names_each_problem_with_its_path_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = VALID_JOB.replace("esp: sandbox", "esp: Sand Box").replace("crm.customers", "crm.customers; drop")
    code, out = _validate(tmp_path, "job.yaml", text, capsys)
    assert code == 1
    assert "line 1: esp: String should match pattern" in out
    assert "line 7: selection.table.table: String should match pattern" in out


def test_a_list_of_jobs_in_json_names_the_job_and_its_missing_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = yaml.safe_load(VALID_JOB)
    bad = {k: v for k, v in good.items() if k != "message"}
    code, out = _validate(tmp_path, "jobs.json", json.dumps([good, bad], indent=2), capsys)
    assert code == 1
    assert re.search(r"line \d+: job 1: message: Field required", out), out


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("job.yaml", "esp: [sandbox\n", "is not valid YAML"),
        ("job.json", "{not json", "is not valid JSON"),
    ],
)
def test_a_file_that_does_not_parse_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, reason: str
) -> None:
    code, out = _validate(tmp_path, name, text, capsys)
    assert (code, reason in out) == (2, True)


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["job", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err

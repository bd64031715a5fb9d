"""``espbridge schema``: the contracts for producers (the messages' JSON Schemas, the AsyncAPI
document) and ``espbridge job validate``: a job file checked against BroadcastJob, offline."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from cli.output import one_line
from shared.infra.documents import DocumentError, read_document
from shared.model.contracts import TRAFFIC, asyncapi_document, message_models, message_schema
from shared.model.messages import BroadcastJob
from shared.model.topics import REGISTRY
from shared.operations.jobs import job_fields

ASYNCAPI_FILE = "asyncapi.yaml"
SCHEMAS_DIR = "schemas"
WRITE_COMMAND = "espbridge schema --write"


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON Schema as its committed file holds it: indented, keys in the model's order."""
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n"


def contract_files() -> dict[str, str]:
    """Every contract file by its path under ``docs/``, with the text the code makes of it now."""
    files = {
        ASYNCAPI_FILE: yaml.safe_dump(asyncapi_document(), sort_keys=False, allow_unicode=True, width=100)
    }
    for name, model in message_models().items():
        files[f"{SCHEMAS_DIR}/{name}.schema.json"] = schema_text(message_schema(model))
    return files


def schema_command(args: argparse.Namespace) -> int:
    """``schema``: the messages and their topics; ``schema MESSAGE``: its JSON Schema;
    ``--asyncapi``: the AsyncAPI document; ``--write DIR``: every contract file under DIR."""
    if args.write is not None:
        root = Path(args.write)
        for relative, text in contract_files().items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(path)
        return 0
    if args.asyncapi:
        print(contract_files()[ASYNCAPI_FILE], end="")
        return 0
    models = message_models()
    if args.message is None:
        width = max(len(n) for n in models)
        for spec in REGISTRY.values():
            print(f"{spec.model.__name__:<{width}}  {spec.topic.value:<30}  key: {TRAFFIC[spec.topic].key}")
        return 0
    model = models.get(args.message)
    if model is None:
        print(
            f"espbridge: unknown message {args.message!r}; known: {', '.join(models)}",
            file=sys.stderr,
        )
        return 2
    print(schema_text(message_schema(model)), end="")
    return 0


def add_parser(groups: Any) -> None:
    """The ``schema`` command and its arguments."""
    p = groups.add_parser(
        "schema",
        help="the contracts for producers: messages, their topics and JSON Schemas, the AsyncAPI document",
        description=SCHEMA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("message", nargs="?", metavar="MESSAGE", help="print this message's JSON Schema")
    p.add_argument("--asyncapi", action="store_true", help="print the AsyncAPI 3.0 document (YAML)")
    p.add_argument(
        "--write",
        nargs="?",
        const="docs",
        metavar="DIR",
        help="write asyncapi.yaml and schemas/<Message>.schema.json under DIR (default: docs)",
    )
    p.set_defaults(cmd="show")


SCHEMA_HELP = """\
The contracts for producers outside espbridge. Without arguments, every message with its topic and
Kafka key; with MESSAGE, its JSON Schema (Draft 2020-12); --asyncapi prints the AsyncAPI 3.0
document of every topic; --write rewrites the committed files (docs/asyncapi.yaml,
docs/schemas/*.schema.json) from the code. Needs no server. Exit 2 for an unknown MESSAGE."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a job is invalid: which job, where in it, on which line of the file (if known)."""

    job: int | None
    where: str
    line: int | None
    what: str

    def __str__(self) -> str:
        place = f"line {self.line}: " if self.line else ""
        job = f"job {self.job}: " if self.job is not None else ""
        return f"  {place}{job}{self.where}: {self.what}"


def _lines(text: str) -> yaml.Node | None:
    """The file's node tree (YAML's, which reads JSON too), for line numbers; None if it has none."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The line of the deepest part of ``loc`` the file holds (a union's tag in ``loc`` is skipped)."""
    if node is None:
        return None
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is not None:
            node = child
    return node.start_mark.line + 1


def job_problems(path: Path) -> list[Problem]:
    """Every problem of a job file (one job, or a list of jobs) against BroadcastJob, each job's
    fields filled in as ``job publish`` fills them; raises OSError or :class:`DocumentError` when
    the file cannot be read or parsed."""
    data = read_document(path)
    tree = _lines(path.read_text(encoding="utf-8", errors="replace"))
    listed = isinstance(data, list)
    problems: list[Problem] = []
    for index, document in enumerate(data if listed else [data]):
        node = tree.value[index] if listed and isinstance(tree, yaml.SequenceNode) else tree
        job = index if listed else None
        if not isinstance(document, dict):
            problems.append(Problem(job, "(job)", _line_of(node, ()), "a job is a mapping of its fields"))
            continue
        try:
            BroadcastJob.model_validate(job_fields(document))
        except ValidationError as exc:
            for e in exc.errors():
                where = ".".join(str(p) for p in e["loc"]) or "(job)"
                problems.append(Problem(job, where, _line_of(node, tuple(e["loc"])), e["msg"]))
    return problems


def job_validate(args: argparse.Namespace) -> int:
    """``job validate``: exit 0 if every job in the file is valid, 1 with each problem, 2 if the
    file cannot be read."""
    path = Path(args.file)
    try:
        problems = job_problems(path)
    except OSError as exc:
        print(f"espbridge: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except DocumentError as exc:
        print(f"espbridge: {path} is not valid {exc.form}: {one_line(str(exc), 500)}", file=sys.stderr)
        return 2
    if problems:
        print(f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
        for problem in problems:
            print(problem)
        return 1
    print(f"{path}: valid (BroadcastJob; checked offline: nothing was read from a server)")
    return 0


VALIDATE_HELP = """\
Check a job file (YAML or JSON; one job, or a list of jobs) against BroadcastJob's schema, offline:
no Kafka, no database, no ESP account. Each problem is printed with its path in the job and the
line of the file. job_id, created_at and requested_by are filled in as `job publish` does. For the
live checks (the account, the columns, the recipients) use `espbridge job check`.
Exit 0 if valid, 1 if invalid, 2 if the file cannot be read or parsed."""

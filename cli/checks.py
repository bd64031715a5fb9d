"""``espbridge job check`` (and ``job publish``'s check): what the check of a job found, for a
person or (``--json``) a program."""

from __future__ import annotations

from cli.output import table
from shared.operations.checking import JobCheck, Verdict

MARKS = {Verdict.OK: "ok", Verdict.FAILED: "FAILED", Verdict.SKIPPED: "skipped"}


def check_report(check: JobCheck) -> str:
    """Every check with its verdict, the first rows of the list file, and what it comes to."""
    job = check.job
    lines = [
        f"job {job.job_id} → {job.esp}/{job.account}, list {job.list_name!r}, message {job.message!r}",
        table([["  " + MARKS[f.verdict], f.check, f.detail] for f in check.findings]),
    ]
    if check.head is not None:
        rows = "the first row" if check.head.rows == 1 else f"the first {check.head.rows} rows"
        lines.append(f"the header and {rows} of {check.head.path}, as the ESP will get them:")
        lines += ["  " + line for line in check.head.text.splitlines()]
    problems = len(check.problems)
    lines.append(
        "the job can be published (nothing was uploaded, published or sent)"
        if check.ok
        else f"the job would fail: {problems} problem{'s' if problems > 1 else ''} (nothing was published)"
    )
    return "\n".join(lines)


def check_json(check: JobCheck) -> dict[str, object]:
    """The check for ``--json``: the verdicts, the counts and the start of the list file."""
    counted = check.counted
    return {
        "job_id": check.job.job_id,
        "ok": check.ok,
        "checks": [
            {"check": f.check, "verdict": f.verdict.value, "detail": f.detail} for f in check.findings
        ],
        "recipients": counted.recipients if counted else None,
        "excluded": counted.excluded if counted else None,
        "excluded_by_subscription_state": counted.by_state if counted else None,
        "excluded_by_suppression_column": counted.by_column if counted else None,
        "list_file": None
        if check.head is None
        else {"path": check.head.path, "rows": check.head.rows, "text": check.head.text},
    }


def refusal(check: JobCheck) -> str:
    """Why ``job publish`` refused a job, for its error line."""
    return "the job fails its check, nothing was published:\n" + "\n".join(f"  {p}" for p in check.problems)

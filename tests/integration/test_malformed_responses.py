"""A response file with malformed rows: the good rows load, each bad row becomes a dead letter
naming the file and the line, and the file is archived — for every file-based connector."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from shared.model.messages import DeadLetter
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment, place
from tests.fixtures.jobs import record_jobs
from tests.fixtures.kafka import read_until
from tests.fixtures.pipeline import loaded_equal
from tests.fixtures.processes import stop
from tests.fixtures.waits import wait_for

GENERIC = (
    "EventId,BroadcastId,MessageId,CommunicationKey,Email,EventType,Url,OccurredAt\n"
    "e1,job-x,m,k1,a@x.com,sent,,2026-11-22T10:00:00Z\n"
    "e2,job-x,m,k2,b@x.com,open,,2026-11-22T10:00:01Z\n"
    "e3,job-x,m,k3,c@x.com,teleport,,2026-11-22T10:00:02Z\n"
    'e4,job-x,m,k4,"d@x.com\nsecond line",click,https://x.com/,2026-11-22T10:00:03Z\n'
    "e5,job-x,m,k5,e@x.com,open,,22/11/2026\n"
    "e6,job-x,m\n"
    "e7,job-x,m,k7,g@x.com,unsubscribe,,2026-11-22T10:00:04+01:00\n"
)
GENERIC_SFTP = (
    "MessageType\turn\temail\tmailingId\tmailingName\ttimestamp\tlink\tbouncetype\tbouncereason\n"
    "Send\tk1\ta@x.com\tjob-x\tl\t1795330000\t\t\t\n"
    "Open\tk2\tb@x.com\tjob-x\tl\t1795330001\t\t\t\n"
    "Teleport\tk3\tc@x.com\tjob-x\tl\t1795330002\t\t\t\n"
    "Click\tk4\td@x.com\tjob-x\tl\t1795330003\thttps://x.com/\t\t\n"
    "Open\tk5\te@x.com\tjob-x\tl\tyesterday\t\t\t\n"
    "Bounce\tk6\n"
    "Unsubscription\tk7\tg@x.com\tjob-x\tl\t1795330004\t\t\t\n"
)
CASES = {
    # esp: (file name, content, good events by type, bad lines)
    "sandbox": (
        "snd-x_001_mixed.csv",
        GENERIC,
        {"sent": 1, "open": 1, "click": 1, "unsubscribe": 1},
        [4, 7, 8],
    ),
    "generic_sftp": (
        "20261122100000_FERGE_mixed.txt",
        GENERIC_SFTP,
        {"sent": 1, "open": 1, "click": 1, "unsubscribe": 1},
        [4, 6, 7],
    ),
}


@pytest.mark.parametrize("esp", sorted(CASES))
async def test_good_rows_load_and_bad_rows_are_dead_lettered_with_file_and_line(
    esp: str, deployment: Deployment
) -> None:
    name, content, good, bad_lines = CASES[esp]
    account, database = deployment.account, deployment.database
    accounts = deployment.accounts_file([deployment.offline_account(esp, account)])
    folder = deployment.response_folders(esp, account)
    place(folder / "responses", name, content)
    await record_jobs(database, esp, account, "job-x")
    env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5")
    with ExitStack() as stack:
        procs = [deployment.start(stack, service, env) for service in ("gatherer", "loader")]
        await wait_for(
            lambda: loaded_equal(database, "job-x", good), timeout_s=60, what="the good rows loaded"
        )
        letters = await read_until(deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= len(bad_lines))
        await wait_for(lambda: (folder / "archive" / name).exists(), timeout_s=30, what="the file archived")
        for proc in procs:
            assert stop(proc) == 0
    dead = [DeadLetter.from_json(r.value or b"") for r in letters]
    remote = f"{esp}/{account}/responses/{name}"
    assert sorted((d.source.kind, d.source.name, d.source.line) for d in dead) == [
        ("file", remote, line) for line in bad_lines
    ]
    assert all(d.payload and d.message for d in dead)
    assert not (folder / "responses" / name).exists()

"""The MailUp flavor's JSON held against the field sets MailUp itself publishes.

The sandbox and the connector are both written from docs/connectors/mailup.md, so their agreement
proves little; here each answer of the flavor is checked against MailUp's own examples, written
out below with their public source. The sandbox runs as a process (no servers needed).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from tests.fixtures.sandbox import BUSY_RATES, Sandboxes, WebhookReceiver
from tests.fixtures.waits import wait_for
from tests.integration.test_sandbox_mailup import FIELDS, STATS, Client, recipient

# Source: services.mailup.com/API/v1.1/Rest/ConsoleService.svc/help/operations/GetImportDetailsByIdImport
# (GET /Console/Imports/{id}, a ConsoleImportDetail).
IMPORT_DETAIL = {
    "EndDate",
    "FieldSeparator",
    "Filename",
    "IdGroups",
    "IdImport",
    "IdList",
    "IgnoreDoubleQuotes",
    "IgnoreFirstRow",
    "ImportAsUnsubscribed",
    "IncludePendingRecipients",
    "OverwriteEmptyFields",
    "ReplaceExistingGroup",
    "Rows",
    "SendConfirmationEmail",
    "StartDate",
    "StatusCode",
}
IMPORT_ROWS = {"Invalid", "Total", "Valid"}
IMPORT_ROWS_VALID = {
    "EmailNew",
    "EmailUpdate",
    "NumberNew",
    "NumberUpdate",
    "RepeatedEmail",
    "RepeatedNumber",
    "Total",
}
IMPORT_ROWS_INVALID = {
    "InvalidEmail",
    "InvalidNumber",
    "Total",
    "WithoutEmail",
    "WithoutNumber",
    "WithoutPrefix",
}
# Source: github.com/mailup/mailup-ruby lib/mailup/console/import.rb and
# github.com/fazland/mailup-rest-client lib/Import.php (GET /Console/Import/{id}); StatusCode as in
# the detail above (1 to run, 2 running, 3 completed, 4 failed: help.mailup.com's page
# WSMailUpImport.GetProcessDetails).
IMPORT_STATUS = {
    "idImport",
    "Completed",
    "CreatedRecipients",
    "ImportedRecipients",
    "NotValidRecipients",
    "UpdatedRecipients",
    "ValidRecipients",
    "StatusCode",
}
# Source: ConsoleService.svc/help/operations/SendMailMessageToRecipientInGroup (MailMessageSendResponse).
SEND_RESPONSE = {"Id", "InvalidRecipients", "Sent", "UnprocessedRecipients", "idMessage"}
# Source: ConsoleService.svc/help/operations/ScheduleImmediateDispatch (EmailSendingItem), also the
# item of the queues GET /Console/Email/Sendings/{Immediate|Deferred|Undefined} (mailup-ruby
# lib/mailup/console/email.rb).
SENDING_ITEM = {"Id", "IdList", "IdMessage", "Notes", "StartDate", "State", "Subject", "Type"}
# Source: help.mailup.com/display/mailupapi/Email+messages, "Retrieve information about sent
# history": {"IsPaginated":false,"Items":[{"EndDate":"2014-04-01 13:53:06Z","Kb_transferred":6302,
# "Recipients":1,"SenderEmail":…,"SenderName":…,"StartDate":"2014-04-01 13:52:35Z","idMessage":12},…],
# "PageNumber":0,"PageSize":20,"Skipped":0,"TotalElementsCount":3}. No sending id, no list id.
SEND_HISTORY_ITEM = {
    "EndDate",
    "Kb_transferred",
    "Recipients",
    "SenderEmail",
    "SenderName",
    "StartDate",
    "idMessage",
}
# Source: mailup-ruby lib/mailup/stats/message.rb (IsPaginated, Items, PageNumber, PageSize, Skipped,
# TotalElementsCount) and help.mailup.com/display/mailupapi/Email+Statistics (paged by default, 20
# a page; the wiki writes PageNumber/PageSize, the gem pageNumber/pageSize).
ENVELOPE = {"IsPaginated", "Items", "PageNumber", "PageSize", "Skipped", "TotalElementsCount"}
DEFAULT_PAGE_SIZE = 20
# Source: help.mailup.com/display/mailupapi/Email+Statistics (List/Recipients example items) and the
# Email Statistics page's List/Clicks and List/UrlClicks items.
STATISTICS_ITEMS = {
    "Recipients": {"Email", "IdMessage", "IdRecipient"},
    "Clicks": {"Count", "Email", "IdRecipient"},
    "UrlClicks": {"Count", "IdMessage", "Url"},
}
# Source: helpmailup.atlassian.net/wiki/spaces/MUG/pages/36869836/Add+or+Edit+a+Webhook: the
# placeholders a webhook's parameters may hold ([Field01]…[Field39] for the personal data
# fields) and the [EventDate] example 2012-09-12T11:18:37.664+02; parameter names are free
# (help.mailup.com/display/MUG/Webhook+examples).
WEBHOOK_PARAMS = (
    "d=[EventDate]&console=[IdConsole]&list=[IdList]&nl=[IdNL]&type=[EventType]&source=[EventSource]"
    "&reason=[Reason]&email=[Email]&prefix=[Prefix]&number=[Number]&groups=[Groups]&channel=[Channel]"
    "&Job=[Field39]&Key=[Field38]&first=[Field01]&fixed=literal"
)
EVENT_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d$")
CHANNELS = {"-1", "0", "1", "2", "5"}
EVENT_SOURCES = {"API", "Console", "Recipient"}


def keys(body: dict[str, Any]) -> set[str]:
    return set(body)


async def test_the_flavors_json_has_the_fields_mailup_publishes(sandbox: Sandboxes) -> None:
    receiver = WebhookReceiver(answer=lambda _call: web.Response(status=204))
    async with receiver:
        settings = {
            **BUSY_RATES,
            "rate_limit_per_s": "0",
            "phase_delay_s": "0.1",
            "mailup_webhook_url": receiver.url,
            "mailup_webhook_params": WEBHOOK_PARAMS,
        }
        with sandbox("mailup", **settings) as esp:
            client = Client(esp)
            await client.login()
            group, import_id = await client.import_job("job-1", 42, 40)

            detail = await client.ok("GET", f"/Console/Imports/{import_id}")
            assert keys(detail) == IMPORT_DETAIL
            assert keys(detail["Rows"]) == IMPORT_ROWS
            assert keys(detail["Rows"]["Valid"]) == IMPORT_ROWS_VALID
            assert keys(detail["Rows"]["Invalid"]) == IMPORT_ROWS_INVALID
            status = await client.ok("GET", f"/Console/Import/{import_id}")
            assert keys(status) == IMPORT_STATUS
            assert (status["Completed"], status["StatusCode"], status["ValidRecipients"]) == (True, 3, 40)

            sent = await client.ok("POST", f"/Console/Group/{group}/Email/42/Send")
            assert keys(sent) == SEND_RESPONSE
            undefined = await client.ok("GET", "/Console/Email/Sendings/Undefined")
            assert keys(undefined) == ENVELOPE
            assert [keys(i) for i in undefined["Items"]] == [SENDING_ITEM]
            confirmed = await client.ok("POST", f"/Console/Email/Sendings/{sent['Id']}/Immediate")
            assert keys(confirmed) == SENDING_ITEM
            manifest = await esp.complete_manifest("job-1")

            history = await client.ok("GET", "/Console/List/1/Email/42/SendHistory")
            assert keys(history) == ENVELOPE
            assert history["IsPaginated"] is False
            assert [keys(i) for i in history["Items"]] == [SEND_HISTORY_ITEM]
            assert (history["Items"][0]["idMessage"], history["Items"][0]["Recipients"]) == (42, 40)

            for kind, fields in STATISTICS_ITEMS.items():
                listed = await client.ok("GET", f"/Message/42/List/{kind}", service=STATS)
                assert keys(listed) == ENVELOPE
                assert listed["PageSize"] == DEFAULT_PAGE_SIZE
                assert listed["Items"], kind
                assert {frozenset(i) for i in listed["Items"]} == {frozenset(fields)}, kind
            clicks = await client.ok(
                "GET", "/Message/42/List/Clicks", service=STATS, params={"pageSize": 100}
            )
            url_clicks = await client.ok("GET", "/Message/42/List/UrlClicks", service=STATS)
            total = manifest["counts"]["click"]
            assert (
                sum(i["Count"] for i in clicks["Items"])
                == sum(i["Count"] for i in url_clicks["Items"])
                == total
            )
            for names in ({"PageNumber": 1, "PageSize": 5}, {"pageNumber": 1, "pageSize": 5}):
                paged = await client.ok("GET", "/Message/42/List/Recipients", service=STATS, params=names)
                assert (paged["PageNumber"], paged["PageSize"], paged["Skipped"], len(paged["Items"])) == (
                    1,
                    5,
                    5,
                    5,
                )
            counted = await client.ok("GET", "/Message/42/Count/Recipients", service=STATS)
            assert counted == 40

            wanted = manifest["counts"]["unsubscribe"] + manifest["counts"]["complaint"]
            calls = await wait_for(
                lambda: receiver.calls if len(receiver.calls) >= wanted > 0 else None,
                10,
                0.02,
                what="the webhook calls",
            )
    for call in calls:
        form = call.form
        assert list(form) == ["Secret", *(p.split("=")[0] for p in WEBHOOK_PARAMS.split("&"))]
        assert EVENT_DATE.fullmatch(form["d"]), form["d"]
        assert form["console"].isdigit()
        assert (form["list"], form["nl"], form["type"], form["fixed"]) == (
            "1",
            "42",
            "Unsubscribe",
            "literal",
        )
        assert form["source"] in EVENT_SOURCES
        assert form["channel"] in CHANNELS
        assert form["groups"].split(",") == [str(group)]
        assert form["reason"].isdigit()
        # [Field39], [Field38] and [Field01]: what the import wrote into those numbered fields.
        number = form["email"].removeprefix("user").split("@")[0]
        imported = recipient(form["email"], f"user-{number}", "42:job-1")
        by_field = {f["Id"]: f["Value"] for f in imported["Fields"]}
        assert (form["Job"], form["Key"], form["first"]) == (
            by_field[FIELDS["EspbridgeJob"]],
            by_field[FIELDS["CommunicationKey"]],
            by_field[FIELDS["FirstName"]],
        )

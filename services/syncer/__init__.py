"""The syncer service: keeps subscriptions in sync both ways, the ESPs ⇄ the CRM."""

DESCRIPTION = (
    "Keeps subscriptions in sync both ways: writes the changes the ESPs report "
    "(subscriptions.changes.v1) to the CRM's crm.subscriptions, once each and in time order, with "
    "their follow-ons per each account's unsubscribe_scope; turns the CRM's own changes captured by "
    "Debezium (crm.subscriptions.captured.v1) into push requests; and pushes requests "
    "(subscriptions.requests.v1) to the ESP accounts through their connectors, in batches within "
    "their rate limits, dead-lettering a contact an ESP refuses with its reason."
)
"""What ``python -m services.syncer --help`` says the service does."""

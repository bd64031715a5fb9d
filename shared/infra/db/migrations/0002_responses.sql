-- responses: one row per response event (idempotent on event_id) and per-broadcast aggregates.
CREATE SCHEMA IF NOT EXISTS responses;

CREATE TABLE responses.events (
    event_id          uuid PRIMARY KEY,
    esp               text NOT NULL,
    account           text NOT NULL,
    broadcast_id      text NOT NULL,
    esp_message_id    text,
    communication_key text,
    email             text,
    type              text NOT NULL CHECK (type IN ('sent', 'delivered', 'bounce_hard', 'bounce_soft',
                                                    'open', 'click', 'unsubscribe', 'complaint',
                                                    'subscribe')),
    url               text,
    occurred_at       timestamptz NOT NULL,
    source            text NOT NULL,
    extra             jsonb,
    loaded_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (communication_key IS NOT NULL OR email IS NOT NULL)
);
CREATE INDEX events_broadcast_type ON responses.events (broadcast_id, type);
CREATE INDEX events_communication_key ON responses.events (communication_key);

-- Maintained by the loader in the same transaction as the rows it inserts (new rows only), so
-- the counts are exact however often an event is delivered.
CREATE TABLE responses.broadcast_type_counts (
    broadcast_id text NOT NULL,
    type         text NOT NULL,
    events       bigint NOT NULL DEFAULT 0,
    first_at     timestamptz,
    last_at      timestamptz,
    PRIMARY KEY (broadcast_id, type)
);

-- The funnel an analyst reads: one row per broadcast, one column per event type.
CREATE VIEW responses.broadcast_funnel AS
SELECT broadcast_id,
       coalesce(sum(events) FILTER (WHERE type = 'sent'), 0)        AS sent,
       coalesce(sum(events) FILTER (WHERE type = 'delivered'), 0)   AS delivered,
       coalesce(sum(events) FILTER (WHERE type = 'bounce_hard'), 0) AS bounce_hard,
       coalesce(sum(events) FILTER (WHERE type = 'bounce_soft'), 0) AS bounce_soft,
       coalesce(sum(events) FILTER (WHERE type = 'open'), 0)        AS opens,
       coalesce(sum(events) FILTER (WHERE type = 'click'), 0)       AS clicks,
       coalesce(sum(events) FILTER (WHERE type = 'unsubscribe'), 0) AS unsubscribes,
       coalesce(sum(events) FILTER (WHERE type = 'complaint'), 0)   AS complaints,
       min(first_at) AS first_event_at,
       max(last_at)  AS last_event_at
FROM responses.broadcast_type_counts
GROUP BY broadcast_id;

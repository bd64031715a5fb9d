-- What `espbridge dlq replay` did with each dead letter, so a replay is done once.
-- A dead letter is named by its own place on the dead-letter topic (the topic name carries the
-- deployment's prefix); the fingerprint tells a recreated topic's reused offsets from the original.
CREATE TABLE control.dead_letter_replays (
    topic        text NOT NULL,
    dl_partition integer NOT NULL,
    dl_offset    bigint NOT NULL,
    fingerprint  text NOT NULL,
    state        text NOT NULL CHECK (state IN ('replayed', 'failing')),
    detail       text NOT NULL DEFAULT '',
    events       integer NOT NULL DEFAULT 0,
    replayed_to  text,
    attempts     integer NOT NULL DEFAULT 1,
    first_at     timestamptz NOT NULL DEFAULT now(),
    last_at      timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    PRIMARY KEY (topic, dl_partition, dl_offset)
);

-- control: broadcast jobs and their state, the status history, and the gathered-file ledger.
CREATE SCHEMA IF NOT EXISTS control;

CREATE TABLE control.jobs (
    job_id            text PRIMARY KEY,
    esp               text NOT NULL,
    account           text NOT NULL,
    job               jsonb NOT NULL,               -- the BroadcastJob as received
    stage             text NOT NULL CHECK (stage IN ('upload', 'import', 'send', 'gather', 'load')),
    state             text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    detail            text NOT NULL DEFAULT '',
    counts            jsonb NOT NULL DEFAULT '{}'::jsonb,
    remote_path       text,                         -- the list file on the ESP's SFTP site
    esp_import_id     text,
    send_requested_at timestamptz,                  -- recorded before the send call, never cleared
    esp_send_id       text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_updated_at ON control.jobs (updated_at);

CREATE TABLE control.job_history (
    job_id  text NOT NULL REFERENCES control.jobs (job_id) ON DELETE CASCADE,
    seq     bigint GENERATED ALWAYS AS IDENTITY,
    stage   text NOT NULL,
    state   text NOT NULL,
    detail  text NOT NULL DEFAULT '',
    counts  jsonb NOT NULL DEFAULT '{}'::jsonb,
    service text NOT NULL DEFAULT '',
    at      timestamptz NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- One row per remote response file ever seen. A file is identified by where it is and by its
-- size and modification time, so a file re-written under the same name is gathered again.
CREATE TABLE control.gathered_files (
    file_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    esp         text NOT NULL,
    account     text NOT NULL,
    path        text NOT NULL,
    size        bigint NOT NULL CHECK (size >= 0),
    mtime       timestamptz NOT NULL,
    state       text NOT NULL DEFAULT 'found'
                CHECK (state IN ('found', 'processing', 'published', 'archived', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    events      bigint,
    bad_rows    bigint,
    error       text,
    archived_to text,
    found_at    timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    UNIQUE (esp, account, path, size, mtime)
);
CREATE INDEX gathered_files_open ON control.gathered_files (state) WHERE state <> 'archived';

-- Where each broadcast's API pull of responses got to, so pulls are incremental and resume.
CREATE TABLE control.api_cursors (
    esp        text NOT NULL,
    account    text NOT NULL,
    job_id     text NOT NULL,
    cursor     text,
    pages      bigint NOT NULL DEFAULT 0,
    events     bigint NOT NULL DEFAULT 0,
    bad_items  bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (esp, account, job_id)
);

-- The communication keys of the lists espbridge uploaded, for accounts whose response rows are
-- attributed to a broadcast by key (shared/esp/attribution.py). Only those accounts' lists are
-- recorded; a list uploaded again replaces its record, and lists older than the account's
-- key_lists_days are removed when the next list of the account is recorded.
CREATE TABLE control.uploaded_lists (
    list_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      text NOT NULL UNIQUE,
    esp         text NOT NULL,
    account     text NOT NULL,
    uploaded_at timestamptz NOT NULL,             -- when the list was complete on the ESP's site
    keys        bigint NOT NULL DEFAULT 0
);
CREATE INDEX uploaded_lists_account ON control.uploaded_lists (esp, account, uploaded_at);

-- No foreign key: a list's keys are written by COPY, and a per-row check would cost more than the
-- upload. A list's rows are written together, so a BRIN index finds them for deletion.
CREATE TABLE control.list_keys (
    list_id           bigint NOT NULL,
    communication_key text NOT NULL
);
CREATE INDEX list_keys_key ON control.list_keys (communication_key, list_id);
CREATE INDEX list_keys_list ON control.list_keys USING brin (list_id);

-- The broadcast lifecycle: the monitor's due work, one row per broadcast whose list was uploaded.
-- A row holds the next step of the broadcast's import and send and when it is due; every monitor
-- claims due rows (FOR UPDATE SKIP LOCKED) under a lease it renews while the step runs, so the ESP
-- call happens outside any transaction and a lease that runs out (a killed process) frees the row.
CREATE TABLE control.broadcast_work (
    job_id        text PRIMARY KEY REFERENCES control.jobs (job_id) ON DELETE CASCADE,
    remote_path   text NOT NULL,                -- the list file the import reads
    step          text NOT NULL CHECK (step IN (
                      'start_import', 'import_status', 'send', 'find_send', 'resend', 'send_status', 'ended'
                  )),
    due_at        timestamptz,                  -- when the step is due; NULL once ended (unless a cancel waits)
    deadline      timestamptz,                  -- the stage in hand (import, send) fails after this
    import_id     text,
    send_id       text,
    polls         integer NOT NULL DEFAULT 0 CHECK (polls >= 0),       -- status polls of this step: the back-off
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),    -- failed tries of this step in a row
    last_error    text NOT NULL DEFAULT '',
    cancel        text NOT NULL DEFAULT 'none' CHECK (cancel IN ('none', 'requested', 'answered')),
    lease         uuid,                         -- the claim of the process running the step
    claimed_by    text NOT NULL DEFAULT '',     -- the process that ran the latest step (host:pid)
    claimed_until timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX broadcast_work_due ON control.broadcast_work (due_at) WHERE due_at IS NOT NULL;

-- Every cancel request, also one for a job espbridge has not received yet: the job is refused when
-- it arrives. No foreign key for that reason. The first request's reason is kept.
CREATE TABLE control.job_cancels (
    job_id       text PRIMARY KEY,
    reason       text NOT NULL DEFAULT '',
    requested_by text NOT NULL DEFAULT '',
    requested_at timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

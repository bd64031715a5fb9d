-- crm subscriptions: each contact's state per ESP account and list, kept in sync both ways by the
-- syncer; the log of every change and request it received; the suppressions selections honour.
CREATE SCHEMA IF NOT EXISTS crm;

CREATE TABLE crm.subscriptions (
    email      text NOT NULL,                -- lower-cased (the trigger does it)
    esp        text NOT NULL,
    account    text NOT NULL,
    list       text NOT NULL,
    -- '*' wildcards: list '*' = every list of the account; esp, account and list '*' = everywhere
    state      text NOT NULL CHECK (state IN ('pending', 'subscribed', 'unsubscribed', 'removed')),
    reason     text NOT NULL DEFAULT '',
    source     text NOT NULL DEFAULT 'crm',  -- who made the change: 'crm' or 'esp/account'
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when it changed at its source
    written_by text NOT NULL DEFAULT 'crm' CHECK (written_by IN ('crm', 'espbridge')),
    change_id  uuid,                         -- the change/request espbridge applied last; NULL: the CRM's
    fields     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- contact data the CRM wants at the ESP
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (email, esp, account, list),
    CHECK (esp <> '*' OR (account = '*' AND list = '*')),
    CHECK (jsonb_typeof(fields) = 'object')
);
-- Debezium's before image carries the whole row (the state a change replaced).
ALTER TABLE crm.subscriptions REPLICA IDENTITY FULL;
CREATE INDEX subscriptions_account_list ON crm.subscriptions (esp, account, list, state);

-- A write in a session that did not `SET LOCAL espbridge.writer = 'espbridge'` is the CRM's own:
-- it is marked so (and captured into pushes); espbridge's writes keep their source, id and time.
CREATE FUNCTION crm.subscriptions_mark_writer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.email := lower(NEW.email);
    NEW.updated_at := clock_timestamp();
    IF coalesce(current_setting('espbridge.writer', true), '') = 'espbridge' THEN
        NEW.written_by := 'espbridge';
        RETURN NEW;
    END IF;
    NEW.written_by := 'crm';
    NEW.source := 'crm';
    NEW.change_id := NULL;
    IF TG_OP = 'UPDATE' AND NEW.state IS DISTINCT FROM OLD.state AND NEW.changed_at <= OLD.changed_at THEN
        NEW.changed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER subscriptions_mark_writer
    BEFORE INSERT OR UPDATE ON crm.subscriptions
    FOR EACH ROW EXECUTE FUNCTION crm.subscriptions_mark_writer();

-- Every change and request the syncer received, applied or not: a change_id is applied once.
CREATE TABLE crm.subscription_log (
    change_id   uuid PRIMARY KEY,
    email       text NOT NULL,
    esp         text NOT NULL,
    account     text NOT NULL,
    list        text NOT NULL,
    state       text CHECK (state IN ('pending', 'subscribed', 'unsubscribed', 'removed')),  -- NULL: fields only
    reason      text NOT NULL DEFAULT '',
    source      text NOT NULL,
    origin      text NOT NULL,               -- esp (a change), producer, capture or follow_on
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'stale', 'unchanged', 'ignored'))
);
CREATE INDEX subscription_log_contact ON crm.subscription_log (email, esp, account, list);
CREATE INDEX subscription_log_received ON crm.subscription_log (received_at);

-- The requests pushed to an ESP and what it answered: a retried batch skips those already here,
-- so a contact the ESP took is never pushed twice.
CREATE TABLE crm.subscription_pushes (
    request_id   uuid PRIMARY KEY,
    email        text NOT NULL,
    esp          text NOT NULL,
    account      text NOT NULL,
    list         text NOT NULL,
    state        text CHECK (state IN ('pending', 'subscribed', 'unsubscribed', 'removed')),
    origin       text NOT NULL,
    accepted     boolean NOT NULL,
    result_state text CHECK (result_state IN ('pending', 'subscribed', 'unsubscribed', 'removed')),
    detail       text NOT NULL DEFAULT '',
    pushed_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX subscription_pushes_pushed ON crm.subscription_pushes (pushed_at);

-- Not to be mailed: a job for account A whose broadcast list is L leaves out an email with a row
-- (A, L), (A, '*') or ('*', '*', '*') here.
CREATE VIEW crm.suppressions AS
SELECT email, esp, account, list, state, reason, source, changed_at
FROM crm.subscriptions
WHERE state IN ('pending', 'unsubscribed', 'removed');

-- The demo CRM's lone opted_out flag becomes subscription state: each opted-out customer of
-- crm.customers (espbridge's own demo table, migration 0003) is unsubscribed everywhere, then the
-- flag's columns go. A CRM of its own, without crm.customers or those columns, is left as it is.
DO $$
BEGIN
    IF (
        SELECT count(*) FROM pg_attribute
        WHERE attrelid = to_regclass('crm.customers') AND NOT attisdropped
          AND attname IN ('opted_out', 'opted_out_at', 'opt_out_reason')
    ) < 3 THEN
        RETURN;
    END IF;
    -- Written as espbridge's (not captured into pushes): the opt-outs are history, not new changes.
    PERFORM set_config('espbridge.writer', 'espbridge', true);
    INSERT INTO crm.subscriptions (email, esp, account, list, state, reason, source, changed_at)
    SELECT DISTINCT ON (lower(btrim(email)))
           lower(btrim(email)), '*', '*', '*', 'unsubscribed',
           coalesce(nullif(btrim(opt_out_reason), ''), 'opted out'), 'crm', coalesce(opted_out_at, created_at)
    FROM crm.customers
    WHERE opted_out AND btrim(email) <> ''
    ORDER BY lower(btrim(email)), coalesce(opted_out_at, created_at) DESC
    ON CONFLICT (email, esp, account, list) DO NOTHING;
    PERFORM set_config('espbridge.writer', '', true);
    DROP INDEX IF EXISTS crm.customers_segment;
    ALTER TABLE crm.customers DROP COLUMN opted_out, DROP COLUMN opted_out_at, DROP COLUMN opt_out_reason;
    CREATE INDEX customers_segment ON crm.customers (segment);
END
$$;

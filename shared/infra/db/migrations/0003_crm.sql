-- crm: the demo CRM side — customers that selections read and opt-outs are written back to.
CREATE SCHEMA IF NOT EXISTS crm;

CREATE TABLE crm.customers (
    customer_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email             text NOT NULL UNIQUE,
    first_name        text,
    last_name         text,
    communication_key text NOT NULL UNIQUE DEFAULT gen_random_uuid()::text,
    opted_out         boolean NOT NULL DEFAULT false,
    opted_out_at      timestamptz,
    opt_out_reason    text,
    city              text,
    country           text,
    segment           text,
    loyalty_points    integer,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_segment ON crm.customers (segment) WHERE NOT opted_out;

-- The calls each ESP account may take, shared by every process of a deployment
-- (shared/infra/db/rate_slots.py, shared/esp/limits.py). An account limited to `calls` calls in
-- any `per_s` seconds has `calls` slots. A call takes a free slot before it starts; while the call
-- runs, free_at is when its lease ends (should its process die), and once it has ended, free_at is
-- per_s after that end. So the ESP never sees more than `calls` calls in any per_s seconds, however
-- many processes call it and however long a call spends on the way. All times are this server's.
CREATE TABLE control.esp_rate_slots (
    esp     text NOT NULL,
    account text NOT NULL,
    slot    integer NOT NULL CHECK (slot >= 0),
    free_at timestamptz NOT NULL DEFAULT 'epoch',       -- a new slot is free
    lease   uuid,                                  -- the call holding the slot now; NULL once it ended
    PRIMARY KEY (esp, account, slot)
);

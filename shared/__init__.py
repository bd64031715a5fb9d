"""espbridge's common library, in layers; each imports only those below it (an import-linter
``layers`` contract holds it):

* ``model``      — messages, topics, response events in their wire form, dead letters, errors; no I/O;
* ``infra``      — Kafka, PostgreSQL (pool, migrations, the control tables' stores), SFTP, the
  health and metrics server, logging, outages;
* ``runtime``    — a service process: start and stop, settings, failpoints, outage watches, tuning;
* ``esp``        — the connector kit and one module of quirks per ESP;
* ``operations`` — work both services and the CLI do: gathering responses, replaying dead letters,
  publishing and following jobs.

Services and the CLI sit on top; the library never imports them.
"""

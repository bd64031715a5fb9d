"""Work both a service and the operator's CLI do: gathering responses, replaying dead letters,
publishing and following broadcast jobs."""

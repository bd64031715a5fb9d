"""Work that is no one service's own: gathering responses (the gatherer on its interval and
``espbridge gather now``), replaying dead letters, and publishing and following broadcast jobs
(the CLI, the demo and the tests)."""

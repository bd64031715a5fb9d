"""``espbridge``: the operator's commands, thin over the library (argument parsing and printing)."""

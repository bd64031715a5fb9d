"""The model: messages and their topics, response events in their wire form, dead letters, errors.

Plain values and rules, no I/O: every other layer builds on it.
"""

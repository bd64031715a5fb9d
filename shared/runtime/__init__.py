"""The service runtime: a service process's start, resources, stop, settings, failpoints and tuning.

Kept light: :mod:`shared.runtime.starting` is the first import of every service process.
"""

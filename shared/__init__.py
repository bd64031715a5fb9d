"""espbridge's common library: settings, topics, message models, Kafka, PostgreSQL and SFTP helpers.

Services depend on this package; it never imports from ``services``.
"""

"""Infrastructure: Kafka, PostgreSQL, SFTP, the health and metrics server, logging, outages.

How espbridge talks to the servers it depends on, knowing nothing of services or ESPs.
"""

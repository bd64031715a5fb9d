"""Ports for servers a test starts later: free, distinct, and out of the kernel's ephemeral range,
where other tests' outgoing connections could take them before the server binds."""

from __future__ import annotations

import socket

from tests.fixtures.servers import EPHEMERAL_RANGE, LOWEST_PICKED_PORT, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = free_ports(4)
    assert len(set(ports)) == 4
    low = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32_768
    if low > LOWEST_PICKED_PORT + 100:
        assert all(LOWEST_PICKED_PORT <= p < low for p in ports), (ports, low)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if it was not free

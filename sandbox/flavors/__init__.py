"""The ESPs the sandbox can play, one module each (``ESPBRIDGE_SANDBOX_FLAVOR``).

A flavor module defines ``FLAVOR``, a :class:`sandbox.flavors.base.Flavor`, and is listed here.
"""

from __future__ import annotations

from sandbox.flavors import deployteq, generic, generic_sftp, instiller, mailup, optimizely
from sandbox.flavors.base import Flavor

FLAVORS: dict[str, Flavor] = {
    f.name: f
    for f in (
        generic.FLAVOR,
        generic_sftp.FLAVOR,
        instiller.FLAVOR,
        mailup.FLAVOR,
        deployteq.FLAVOR,
        optimizely.FLAVOR,
    )
}

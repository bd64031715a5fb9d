"""A private set of Kafka, PostgreSQL and sshd for tests that stop and start servers.

Started with the project's own ``infra/local.sh`` under a state directory of their own and on free
ports, so stopping one of them never touches the servers other tests share. ``down`` and ``up``
take one component at a time; at the end all of them are stopped and the state directory removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.servers import LOCAL, Servers, free_ports, parse_env_file, servers_from_env

COMPONENTS = ("kafka", "postgres", "sftp")


@dataclass
class PrivateServers:
    """Servers that belong to one test module: the script environment and the connection settings."""

    state_dir: Path
    script_env: dict[str, str]
    servers: Servers

    def down(self, component: str) -> None:
        """Stop one private server (``infra/local.sh down <component>``)."""
        assert component in COMPONENTS, component
        local_sh(self.script_env, "down", component)

    def up(self, component: str) -> None:
        """Start one private server again (``infra/local.sh up <component>``)."""
        assert component in COMPONENTS, component
        local_sh(self.script_env, "up", component)


def local_sh(env: dict[str, str], *args: str, timeout_s: float = 300.0) -> None:
    """Run ``infra/local.sh`` with a private set's environment; its output is in the error."""
    result = subprocess.run(
        [str(LOCAL), *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"infra/local.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def script_env(state_dir: Path) -> dict[str, str]:
    """The environment of ``infra/local.sh`` for a private set: own state directory, own ports."""
    kafka, controller, pg, sftp = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPBRIDGE_")}
    cache = os.environ.get("ESPBRIDGE_CACHE_DIR")
    if cache:
        env["ESPBRIDGE_CACHE_DIR"] = cache
    env.update(
        ESPBRIDGE_STATE_DIR=str(state_dir),
        ESPBRIDGE_KAFKA_PORT=str(kafka),
        ESPBRIDGE_KAFKA_CONTROLLER_PORT=str(controller),
        ESPBRIDGE_PG_PORT=str(pg),
        # inside the state directory, so that removing it leaves nothing behind (also as root,
        # where the default is under /var/lib/postgresql)
        ESPBRIDGE_PG_DATA_DIR=str(state_dir / "postgres" / "data"),
        ESPBRIDGE_SFTP_PORT=str(sftp),
    )
    return env


@contextmanager
def private_servers() -> Iterator[PrivateServers]:
    """Start a private Kafka, PostgreSQL and sshd for the block; all stopped and removed after it."""
    # Not under pytest's tmp_path: as root, PostgreSQL runs as user postgres, which must be able to
    # reach its data directory; the system temp directory is world-traversable.
    state_dir = Path(tempfile.mkdtemp(prefix="espbridge-outages-"))
    state_dir.chmod(0o755)
    env = script_env(state_dir)
    try:
        local_sh(env, "up", *COMPONENTS, timeout_s=600.0)
        env_text = (state_dir / "espbridge.env").read_text(encoding="utf-8")
        yield PrivateServers(state_dir, env, servers_from_env(parse_env_file(env_text)))
    finally:
        # `down` stops only what this state directory's `up` recorded as started
        try:
            local_sh(env, "down")
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)

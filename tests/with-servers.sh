#!/usr/bin/env bash
# tests/with-servers.sh COMMAND… — run COMMAND (the test suite) against real local servers.
#
# Servers named by ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS, ESPBRIDGE_PG_HOST and ESPBRIDGE_SFTP_HOST are
# used as given (and the Kafka Connect worker of ESPBRIDGE_CONNECT_URL). Otherwise `infra/local.sh up`
# starts the components that are not running (Kafka Connect among them), the command runs with
# their settings in its environment, and exactly the components started here are stopped afterwards
# (also on failure or Ctrl-C); servers that were already running stay.
# Starting them once, before the test processes fork, lets parallel test workers share them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS:-}" && -n "${ESPBRIDGE_PG_HOST:-}" && -n "${ESPBRIDGE_SFTP_HOST:-}" ]]; then
  exec "$@"
fi

started=()
for component in kafka postgres sftp connect; do
  infra/local.sh status "$component" >/dev/null 2>&1 || started+=("$component")
done
stop_started() {
  if ((${#started[@]})); then
    infra/local.sh down "${started[@]}" >/dev/null 2>&1 || echo "tests: could not stop ${started[*]}" >&2
  fi
}
trap stop_started EXIT
if ((${#started[@]})); then
  infra/local.sh up "${started[@]}"
fi
set -a
# shellcheck source=/dev/null
. "$(infra/local.sh env >/dev/null && echo "${ESPBRIDGE_STATE_DIR:-$PWD/.run}/espbridge.env")"
set +a
"$@"

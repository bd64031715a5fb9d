#!/usr/bin/env bash
# Generate the files compose.yaml mounts as secrets, once: the SFTP server's host key, the client
# key espbridge logs in with, a known_hosts that pins the host key for the host name "sftp", and
# the PostgreSQL password (also as the properties file the Kafka Connect worker reads it from).
# Existing files are kept, so the pinned key never changes silently.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${ESPBRIDGE_STATE_DIR:-$PWD/.run}/compose"
mkdir -p "$dir"
chmod 700 "$dir"
[[ -f "$dir/ssh_host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N '' -C espbridge-sftp-host -f "$dir/ssh_host_ed25519_key"
[[ -f "$dir/client_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C espbridge-sftp-client -f "$dir/client_ed25519"
read -r type key _ <"$dir/ssh_host_ed25519_key.pub"
printf 'sftp %s %s\n' "$type" "$key" >"$dir/known_hosts"
[[ -f "$dir/pg_password" ]] || (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(16))' >"$dir/pg_password")
# the same password for the Kafka Connect worker's FileConfigProvider (${file:<path>:password})
[[ -f "$dir/connect-crm-postgres.properties" ]] ||
  (umask 077 && printf 'password=%s\n' "$(<"$dir/pg_password")" >"$dir/connect-crm-postgres.properties")
# The containers run as other users than the one generating the files: make them readable.
chmod 644 "$dir"/* && chmod 755 "$dir"
echo "compose secrets in $dir" >&2

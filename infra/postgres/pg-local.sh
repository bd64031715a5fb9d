#!/usr/bin/env bash
# infra/postgres/pg-local.sh — espbridge's OWN PostgreSQL 15 cluster (not Debian's "main" cluster),
# TCP on 127.0.0.1 only, unix socket inside its data directory.
#
#   pg-local.sh start | stop | restart | status | psql [psql args...] | env
#
#   start   initdb once, (re)write settings, `pg_ctl start -w`, then idempotently ensure role
#           `espbridge` (LOGIN CREATEDB, password from the password file) and database `espbridge`
#   status  one line: name address state pid rss   (exit 0 running, 1 not accepting, 3 stopped)
#   psql    psql as the cluster superuser over the unix socket (default database: espbridge)
#   env     print the ESPBRIDGE_PG_* export lines
#
# Who runs the server:
#   root      -> OS user `postgres` (runuser), data dir /var/lib/postgresql/espbridge-$PORT
#                (owned by postgres: the repo path may not be traversable by that user)
#   otherwise -> the current user, data dir $ESPBRIDGE_STATE_DIR/postgres/data
#
# Environment (all optional):
#   ESPBRIDGE_PG_PORT            TCP port                                   default 55432
#   ESPBRIDGE_PG_DATA_DIR        data directory override
#   ESPBRIDGE_PG_PASSWORD_FILE   password of role espbridge; used as is when it exists, otherwise a random
#                                password is generated into it   default $ESPBRIDGE_STATE_DIR/secrets/pg_password
#   ESPBRIDGE_PG_BINDIR          PostgreSQL binaries                        default /usr/lib/postgresql/15/bin
#   ESPBRIDGE_PG_START_TIMEOUT / ESPBRIDGE_PG_STOP_TIMEOUT   seconds        default 60 / 60
#   ESPBRIDGE_STATE_DIR          see infra/lib/common.sh
set -euo pipefail

COMPONENT=postgres
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

server_settings PG 55432 60 60
PG_BINDIR="$ESPBRIDGE_PG_BINDIR"
PG_DATABASE=espbridge
PG_ROLE=espbridge
PSTATE="$ESPBRIDGE_STATE_DIR/postgres"

if ((EUID == 0)); then
  PG_OS_USER=postgres
  DATA_DIR="${ESPBRIDGE_PG_DATA_DIR:-/var/lib/postgresql/espbridge-$PORT}"
else
  PG_OS_USER="$(id -un)"
  DATA_DIR="${ESPBRIDGE_PG_DATA_DIR:-$PSTATE/data}"
fi
[[ "$DATA_DIR" == /* ]] || DATA_DIR="$PWD/$DATA_DIR"
# the bootstrap superuser created by initdb is named after the OS user that runs initdb
PG_SUPERUSER="$PG_OS_USER"
SOCKET_DIR="$DATA_DIR"
LOG_FILE="$DATA_DIR/log/postgresql.log"
CONF_FILE="$DATA_DIR/espbridge.conf"

# password file: an existing ESPBRIDGE_PG_PASSWORD_FILE is used as is; otherwise generated (once)
PW_FILE="${ESPBRIDGE_PG_PASSWORD_FILE:-$ESPBRIDGE_STATE_DIR/secrets/pg_password}"
[[ "$PW_FILE" == /* ]] || PW_FILE="$PWD/$PW_FILE"

# ---- helpers -----------------------------------------------------------------------------------
as_pg() { # run a command as the cluster's OS user, from / (that user may not be able to read $PWD)
  if ((EUID == 0)); then
    (cd / && runuser -u "$PG_OS_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

ensure_prereqs() {
  ensure_component_packages postgres
  if ((EUID == 0)); then
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "OS user '$PG_OS_USER' missing (it comes with postgresql-common)"
  fi
  # unix socket paths are limited to 107 bytes
  local sock="$SOCKET_DIR/.s.PGSQL.$PORT"
  ((${#sock} <= 100)) || die "socket path too long (${#sock} > 100): $sock — use a shorter ESPBRIDGE_STATE_DIR or ESPBRIDGE_PG_DATA_DIR"
}

postmaster_pid() { read_pid_file "$DATA_DIR/postmaster.pid"; }

is_running() { # a live postmaster for OUR data directory
  local pid
  pid="$(postmaster_pid)"
  pid_alive "$pid" && pid_cmdline_has "$pid" "$DATA_DIR"
}

accepting() { "$PG_BINDIR/pg_isready" -q -h "$HOST" -p "$PORT" -t 3 >/dev/null 2>&1; }

dump_log() {
  log "---- tail $LOG_FILE"
  tail -n 30 "$LOG_FILE" >&2 2>/dev/null || true
}

ensure_password_file() {
  if [[ -f "$PW_FILE" ]]; then
    [[ -s "$PW_FILE" ]] || die "password file $PW_FILE is empty"
    return 0
  fi
  local dir
  dir="$(dirname "$PW_FILE")"
  mkdir -p "$dir"
  [[ "$dir" != "$ESPBRIDGE_STATE_DIR/secrets" ]] || chmod 700 "$dir"
  (
    umask 077
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$PW_FILE.tmp"
    printf '\n' >>"$PW_FILE.tmp"
    mv "$PW_FILE.tmp" "$PW_FILE"
  )
  chmod 600 "$PW_FILE"
  log "generated a random password for role $PG_ROLE into $PW_FILE (mode 600)"
}

# ---- cluster -----------------------------------------------------------------------------------
init_cluster() {
  if [[ -f "$DATA_DIR/PG_VERSION" ]]; then
    local v
    v="$(<"$DATA_DIR/PG_VERSION")"
    [[ "$v" == 15 ]] || die "$DATA_DIR holds a PostgreSQL $v cluster, expected 15"
    return 0
  fi
  if [[ -d "$DATA_DIR" ]] && [[ -n "$(ls -A "$DATA_DIR")" ]]; then
    die "$DATA_DIR exists, is not empty and is not a PostgreSQL data directory; refusing to touch it"
  fi
  local parent
  parent="$(dirname "$DATA_DIR")"
  if [[ ! -d "$parent" ]]; then
    mkdir -p "$parent"
    ((EUID != 0)) || chown "$PG_OS_USER:" "$parent"
  fi
  local t0
  t0="$(now_us)"
  log "initdb $DATA_DIR (as $PG_OS_USER)"
  mkdir -p "$PSTATE"
  as_pg "$PG_BINDIR/initdb" -D "$DATA_DIR" -U "$PG_SUPERUSER" --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 --no-instructions >"$PSTATE/initdb.log" 2>&1 ||
    { cat "$PSTATE/initdb.log" >&2; die "initdb failed"; }
  as_pg mkdir -p -m 700 "$DATA_DIR/log"
  log "initdb done in $(elapsed_s "$t0")s"
}

# settings live in espbridge.conf (rewritten on every start), included from postgresql.conf once
write_conf() {
  as_pg tee "$CONF_FILE" >/dev/null <<EOF
# Generated by infra/postgres/pg-local.sh on every start — edit the script, not this file.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
unix_socket_permissions = 0700
max_connections = 200
password_encryption = 'scram-sha-256'
# small dev machine (2 cores)
shared_buffers = 256MB
effective_cache_size = 1GB
work_mem = 8MB
maintenance_work_mem = 128MB
wal_buffers = 16MB
max_wal_size = 2GB
min_wal_size = 256MB
checkpoint_timeout = 15min
# durability: fsync stays on; commits do not wait for the WAL flush (dev cluster)
fsync = on
synchronous_commit = off
# logical decoding: Kafka Connect's Debezium connector captures the CRM's subscription changes
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
# logging to stderr -> pg_ctl log file
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = -1
EOF
  if ! grep -qx "include_if_exists = 'espbridge.conf'" "$DATA_DIR/postgresql.conf"; then
    printf "\n# espbridge settings (infra/postgres/pg-local.sh)\ninclude_if_exists = 'espbridge.conf'\n" |
      as_pg tee -a "$DATA_DIR/postgresql.conf" >/dev/null
  fi
}

# role + database; the password travels on psql's stdin only (never argv, never the server log)
ensure_role_and_db() {
  ensure_password_file
  local pw
  pw="$(<"$PW_FILE")"
  pw="${pw%$'\r'}"
  [[ -n "$pw" ]] || die "password file $PW_FILE is empty"
  [[ "$pw" != *$'\n'* ]] || die "password file $PW_FILE must hold a single line"
  # psql meta-command quoting: backslash and single quote escaped inside '...'
  pw="${pw//\\/\\\\}"
  pw="${pw//\'/\'\'}"
  {
    printf '%s%s%s\n' "\\set pw '" "$pw" "'"
    cat <<SQL
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
SELECT format('CREATE ROLE %I', '$PG_ROLE')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE') \\gexec
ALTER ROLE $PG_ROLE WITH LOGIN CREATEDB REPLICATION PASSWORD :'pw';
\\unset pw
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', '$PG_DATABASE', '$PG_ROLE', 'UTF8')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE') \\gexec
ALTER DATABASE $PG_DATABASE OWNER TO $PG_ROLE;
SQL
  } | as_pg "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -p "$PORT" -U "$PG_SUPERUSER" -d postgres \
    >/dev/null || die "could not create/update role $PG_ROLE and database $PG_DATABASE"
  log "role $PG_ROLE and database $PG_DATABASE ready (password file $PW_FILE)"
}

# ---- commands ----------------------------------------------------------------------------------
cmd_start() {
  ensure_prereqs
  if is_running; then
    if ! accepting; then
      log "postmaster $(postmaster_pid) is up but not accepting yet; waiting"
      wait_server_ready "$(postmaster_pid)" accepting ||
        { dump_log; die "not accepting on $ADDRESS after ${START_TIMEOUT}s"; }
    fi
    log "already running (pid $(postmaster_pid)) on $ADDRESS, data $DATA_DIR"
    ensure_role_and_db
    return 0
  fi
  if port_open "$HOST" "$PORT"; then
    die "port $PORT on $HOST is in use by another process"
  fi
  local t_total t0
  t_total="$(now_us)"
  init_cluster
  write_conf
  log "starting PostgreSQL 15 on $ADDRESS (data $DATA_DIR, log $LOG_FILE)"
  t0="$(now_us)"
  # -w: pg_ctl itself polls until the server reports "ready" (bounded by -t)
  if ! as_pg "$PG_BINDIR/pg_ctl" start -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$START_TIMEOUT" -s; then
    dump_log
    die "pg_ctl start failed"
  fi
  log "ready on $ADDRESS in $(elapsed_s "$t0")s (pid $(postmaster_pid), RSS $(kb_to_mb "$(rss_kb "$(postmaster_pid)")"))"
  ensure_role_and_db
  log "start took $(elapsed_s "$t_total")s in total (including initdb when needed)"
}

cmd_stop() {
  if ! is_running; then
    log "not running"
    return 0
  fi
  local t0 pid
  pid="$(postmaster_pid)"
  t0="$(now_us)"
  log "stopping pid $pid (pg_ctl stop -m fast)"
  as_pg "$PG_BINDIR/pg_ctl" stop -D "$DATA_DIR" -m fast -w -t "$STOP_TIMEOUT" -s || {
    log "fast shutdown failed, trying immediate"
    as_pg "$PG_BINDIR/pg_ctl" stop -D "$DATA_DIR" -m immediate -w -t "$STOP_TIMEOUT" -s || die "could not stop pid $pid"
  }
  report_stopped "$t0"
}

cmd_status() { server_status "$(postmaster_pid)" accepting; }

cmd_psql() {
  is_running || die "not running (start it with: $0 start)"
  if ((EUID == 0)); then
    runuser -u "$PG_OS_USER" -- "$PG_BINDIR/psql" -h "$SOCKET_DIR" -p "$PORT" -U "$PG_SUPERUSER" -d "$PG_DATABASE" "$@"
  else
    "$PG_BINDIR/psql" -h "$SOCKET_DIR" -p "$PORT" -U "$PG_SUPERUSER" -d "$PG_DATABASE" "$@"
  fi
}

cmd_env() {
  cat <<EOF
export ESPBRIDGE_PG_HOST=$HOST
export ESPBRIDGE_PG_PORT=$PORT
export ESPBRIDGE_PG_DATABASE=$PG_DATABASE
export ESPBRIDGE_PG_USER=$PG_ROLE
export ESPBRIDGE_PG_PASSWORD_FILE=$(printf '%q' "$PW_FILE")
EOF
}

other_command() {
  case "${1:-}" in
    psql)
      shift
      cmd_psql "$@"
      ;;
    *)
      echo "usage: $0 {start|stop|restart|status|psql [args]|env}" >&2
      exit 2
      ;;
  esac
}

run_server_command "$@"

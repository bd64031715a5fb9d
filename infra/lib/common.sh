# shellcheck shell=bash
# infra/lib/common.sh — helpers shared by the espbridge local-infrastructure scripts.
# Sourced (never executed) by infra/local.sh and infra/{kafka,postgres,sftp,connect}/*.sh.
# The sourcing script sets COMPONENT (log prefix) before sourcing.
#
# Environment honoured by every script:
#   ESPBRIDGE_STATE_DIR  runtime state (configs, data, logs, pids, keys, secrets)  default: <repo>/.run
#   ESPBRIDGE_CACHE_DIR  downloads kept across state resets (Kafka, Connect jars)  default: $HOME/.cache/espbridge

COMPONENT="${COMPONENT:-espbridge}"

ESPBRIDGE_INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ESPBRIDGE_ROOT="$(cd "$ESPBRIDGE_INFRA_DIR/.." && pwd)"

ESPBRIDGE_STATE_DIR="${ESPBRIDGE_STATE_DIR:-$ESPBRIDGE_ROOT/.run}"
[[ "$ESPBRIDGE_STATE_DIR" == /* ]] || ESPBRIDGE_STATE_DIR="$PWD/$ESPBRIDGE_STATE_DIR"
ESPBRIDGE_CACHE_DIR="${ESPBRIDGE_CACHE_DIR:-$HOME/.cache/espbridge}"
[[ "$ESPBRIDGE_CACHE_DIR" == /* ]] || ESPBRIDGE_CACHE_DIR="$PWD/$ESPBRIDGE_CACHE_DIR"
export ESPBRIDGE_STATE_DIR ESPBRIDGE_CACHE_DIR

# Loopback only: nothing here is meant to be reachable from another machine.
# shellcheck disable=SC2034  # used by the sourcing scripts
ESPBRIDGE_BIND_HOST="127.0.0.1"

# ---- logging -------------------------------------------------------------------------------
log() { printf '[%s] %s\n' "$COMPONENT" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$COMPONENT" "$*" >&2; exit 1; }

# ---- time (microsecond wall clock; EPOCHREALTIME's separator depends on the locale) ---------
now_us() { local t="${EPOCHREALTIME//[!0-9]/}"; printf '%s\n' "$((10#$t))"; }
# elapsed_s START_US -> "12.34"
elapsed_s() {
  local d=$(( $(now_us) - $1 ))
  printf '%d.%02d\n' "$((d / 1000000))" "$(((d / 10000) % 100))"
}

# ---- validation ----------------------------------------------------------------------------
require_port() {  # require_port NAME VALUE
  if [[ ! "$2" =~ ^[0-9]+$ ]] || (($2 < 1 || $2 > 65535)); then
    die "$1 must be a TCP port number, got '$2'"
  fi
}

# server_settings NAME PORT START_S STOP_S: the settings of a server script, from
# ESPBRIDGE_<NAME>_PORT, _START_TIMEOUT and _STOP_TIMEOUT (these defaults when unset): HOST (the
# loopback address), PORT (validated), ADDRESS, START_TIMEOUT and STOP_TIMEOUT.
server_settings() {
  local port="ESPBRIDGE_$1_PORT" start="ESPBRIDGE_$1_START_TIMEOUT" stop="ESPBRIDGE_$1_STOP_TIMEOUT"
  HOST="$ESPBRIDGE_BIND_HOST"
  PORT="${!port:-$2}"
  require_port "$port" "$PORT"
  ADDRESS="$HOST:$PORT"
  START_TIMEOUT="${!start:-$3}"
  STOP_TIMEOUT="${!stop:-$4}"
}

# ---- processes -----------------------------------------------------------------------------
port_open() {  # port_open HOST PORT -> 0 when something accepts TCP connections there
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# port_listening IPV4 PORT -> 0 when a socket is in LISTEN state there (read from /proc/net/tcp,
# so unlike port_open it makes no connection and leaves nothing in the server's log)
port_listening() {
  local a b c d want
  IFS=. read -r a b c d <<<"$1"
  want="$(printf '%02X%02X%02X%02X:%04X' "$d" "$c" "$b" "$a" "$2")"
  awk -v w="$want" '$2 == w && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp 2>/dev/null
}

# pid_alive PID -> 0 while the process exists and is not a zombie (a server whose launcher exited is
# reparented to PID 1, which may reap it late; `kill -0` alone would call a zombie alive)
pid_alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local stat=""
  if ! { stat="$(<"/proc/$1/stat")"; } 2>/dev/null; then
    [[ ! -d /proc/self ]] # no procfs: trust kill -0; with procfs: it just exited
    return
  fi
  stat="${stat##*) }"
  [[ "${stat%% *}" == Z ]] || return 0
  # a zombie leader whose other threads are still exiting (still holding its sockets) counts as alive
  local tasks=("/proc/$1/task/"*)
  ((${#tasks[@]} > 1))
}

read_pid_file() {  # first line of a pid file, digits only, or nothing
  local line=""
  if [[ -r "$1" ]]; then IFS= read -r line <"$1" || true; fi
  if [[ "$line" =~ ^[0-9]+$ ]]; then printf '%s\n' "$line"; fi
}

# pid_cmdline_has PID STRING -> 0 when the process's command line contains STRING
pid_cmdline_has() {
  local cmdline=""
  { cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline")"; } 2>/dev/null || return 1
  [[ "$cmdline" == *"$2"* ]]
}

rss_kb() {  # resident set size of PID in KiB (VmRSS from /proc/PID/status), empty if gone
  awk '/^VmRSS:/ { print $2; exit }' "/proc/$1/status" 2>/dev/null || true
}

kb_to_mb() { [[ -n "${1:-}" ]] && awk -v k="$1" 'BEGIN { printf "%.1fMB\n", k / 1024 }' || echo "-"; }

child_pids() {  # direct children of PID (read from /proc; procps may be absent on a fresh box)
  local parent="$1" f stat rest ppid
  for f in /proc/[0-9]*/stat; do
    { stat="$(<"$f")"; } 2>/dev/null || continue
    rest="${stat##*) }"            # fields after "(comm) ": state ppid ...
    read -r _ ppid _ <<<"$rest"
    if [[ "$ppid" == "$parent" ]]; then f="${f#/proc/}"; printf '%s\n' "${f%/stat}"; fi
  done
}

# stop_pid PID TIMEOUT_S: SIGTERM, poll until gone (deadline), then SIGKILL.
stop_pid() {
  local pid="$1" timeout="$2" deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + timeout))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "pid $pid still alive after ${timeout}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  # a SIGKILLed process disappears asynchronously; wait (bounded) for it
  deadline=$((SECONDS + 10))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  ! pid_alive "$pid"
}

# wait_port_closed HOST PORT TIMEOUT_S
wait_port_closed() {
  local deadline=$((SECONDS + $3))
  while port_open "$1" "$2"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# ---- the commands every server script has ----------------------------------------------------
# The sourcing script has called server_settings (these read its HOST, PORT, ADDRESS and timeouts),
# defines is_running (its own server's process runs) and, for a server it runs from a pid file,
# PID_FILE.

# wait_server_ready PID READY: poll READY (a function of the script) until it succeeds.
# Returns 0 then, 2 when process PID is gone first (its pid file removed), 1 after START_TIMEOUT.
wait_server_ready() {
  local pid="$1" ready="$2" deadline=$((SECONDS + START_TIMEOUT))
  until "$ready"; do
    if ! pid_alive "$pid"; then
      rm -f "${PID_FILE:-}"
      return 2
    fi
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# stop_server WHAT [BEFORE]: `stop` of a server run from $PID_FILE: SIGTERM, SIGKILL after
# STOP_TIMEOUT, the pid file removed, then (bounded) until the port is closed. WHAT ends the
# "stopping pid N" line; BEFORE, a function of the script, runs first with the pid.
stop_server() {
  local what="$1" before="${2:-}" pid t0
  if ! is_running; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  pid="$(read_pid_file "$PID_FILE")"
  t0="$(now_us)"
  log "stopping pid $pid$what"
  [[ -z "$before" ]] || "$before" "$pid"
  stop_pid "$pid" "$STOP_TIMEOUT" || die "pid $pid did not exit"
  rm -f "$PID_FILE"
  report_stopped "$t0"
}

# report_stopped T0_US: after a stop, wait (bounded) until the port is closed; log how long it took
report_stopped() {
  wait_port_closed "$HOST" "$PORT" 10 || log "WARNING: $ADDRESS still accepts after stop"
  log "stopped in $(elapsed_s "$1")s"
}

# run_server_command CMD [ARGS...]: start | stop | restart | status | env through the script's
# cmd_* functions; any other command is the script's own other_command (a usage error there).
run_server_command() {
  case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop && cmd_start ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) other_command "$@" ;;
  esac
}

# print_status NAME ADDRESS STATE PID RSS_KB  — the one-line format shared by every `status`
print_status() {
  printf '%-9s %-16s %-8s pid=%-8s rss=%s\n' "$1" "$2" "$3" "${4:--}" "$(kb_to_mb "${5:-}")"
}

# server_status PID ACCEPTING: `status`, the one line (COMPONENT at ADDRESS) and its exit code:
# 0 running, 1 started but not accepting yet (ACCEPTING, a function of the script, fails), 3 stopped.
server_status() {
  local pid="$1" accepting="$2"
  if ! is_running; then
    print_status "$COMPONENT" "$ADDRESS" stopped "" ""
    return 3
  fi
  if "$accepting"; then
    print_status "$COMPONENT" "$ADDRESS" running "$pid" "$(rss_kb "$pid")"
    return 0
  fi
  print_status "$COMPONENT" "$ADDRESS" starting "$pid" "$(rss_kb "$pid")"
  return 1
}

# wait_started PID T0_US WHAT: `start`'s wait until the server accepts (ACCEPTING is the script's
# `accepting`); on timeout the script's `dump_logs` are shown, it is stopped and this dies. Returns 2
# when process PID is gone first; once ready, its RSS is kept in RSS_FILE and the time logged.
wait_started() {
  local pid="$1" t0="$2" what="$3" rc=0 rss
  wait_server_ready "$pid" accepting || rc=$?
  if ((rc == 1)); then
    dump_logs
    cmd_stop || true
    die "$what not accepting on $ADDRESS after ${START_TIMEOUT}s"
  fi
  ((rc == 0)) || return "$rc"
  rss="$(rss_kb "$pid")"
  printf '%s\n' "$rss" >"$RSS_FILE"
  log "ready on $ADDRESS in $(elapsed_s "$t0")s (pid $pid, RSS $(kb_to_mb "$rss"))"
}

# already_started WHAT: at `start`, 0 when the script's server (`is_running`) accepts, after waiting
# for one still starting; 1 when a new one must be started (none runs, or the starting one exited).
already_started() {
  is_running || return 1
  if accepting; then
    log "already running (pid $(current_pid)) on $ADDRESS"
    return 0
  fi
  log "process $(current_pid) is up but $ADDRESS does not accept yet; waiting"
  local rc=0
  wait_started "$(current_pid)" "$(now_us)" "$1" || rc=$?
  ((rc == 2)) || return 0
  log "that process exited; starting a new $1"
  wait_port_closed "$HOST" "$PORT" 10 || true
  return 1
}

# ---- packages ------------------------------------------------------------------------------
# ensure_packages CHECK=PACKAGE ...
#   CHECK is a command name (looked up in PATH) or an absolute path (must be executable).
#   Missing ones are installed with apt-get (as root, or via passwordless sudo); `apt-get update`
#   runs at most once per invocation tree (ESPBRIDGE_APT_UPDATED is exported to child scripts).
ensure_packages() {
  local spec check pkg missing=() sudo=()
  for spec in "$@"; do
    check="${spec%%=*}" pkg="${spec#*=}"
    if [[ "$check" == /* ]]; then
      [[ -x "$check" ]] && continue
    else
      command -v "$check" >/dev/null 2>&1 && continue
    fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      die "missing packages: ${missing[*]} — install them as root: apt-get install -y ${missing[*]}"
    fi
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing packages: ${missing[*]} and no apt-get on this machine"
  if [[ "${ESPBRIDGE_APT_UPDATED:-0}" != 1 ]]; then
    log "apt-get update"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    ESPBRIDGE_APT_UPDATED=1
    export ESPBRIDGE_APT_UPDATED
  fi
  log "apt-get install -y ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
  for spec in "$@"; do
    check="${spec%%=*}"
    if [[ "$check" == /* ]]; then
      [[ -x "$check" ]] || die "$check still missing after installing ${spec#*=}"
    else
      command -v "$check" >/dev/null 2>&1 || die "$check still missing after installing ${spec#*=}"
    fi
  done
}

# ---- per-component facts shared with infra/local.sh ------------------------------------------
ESPBRIDGE_KAFKA_VERSION="${ESPBRIDGE_KAFKA_VERSION:-4.2.1}"
ESPBRIDGE_PG_BINDIR="${ESPBRIDGE_PG_BINDIR:-/usr/lib/postgresql/15/bin}"
ESPBRIDGE_SSHD="${ESPBRIDGE_SSHD:-/usr/sbin/sshd}"
ESPBRIDGE_DEBEZIUM_VERSION="${ESPBRIDGE_DEBEZIUM_VERSION:-3.6.1.Final}"

kafka_lib_dir() { printf '%s\n' "$ESPBRIDGE_CACHE_DIR/kafka/lib-$ESPBRIDGE_KAFKA_VERSION"; }
connect_lib_dir() {
  printf '%s\n' "$ESPBRIDGE_CACHE_DIR/connect/kafka-$ESPBRIDGE_KAFKA_VERSION-debezium-$ESPBRIDGE_DEBEZIUM_VERSION"
}

# component_requirements NAME -> CHECK=PACKAGE specs for ensure_packages
component_requirements() {
  case "$1" in
    kafka)
      echo "java=openjdk-17-jre-headless"
      # Maven is only needed until the jar cache is populated
      [[ -f "$(kafka_lib_dir)/.complete" ]] || echo "mvn=maven"
      ;;
    connect)
      echo "java=openjdk-17-jre-headless"
      [[ -f "$(connect_lib_dir)/.complete" ]] || echo "mvn=maven"
      ;;
    postgres)
      echo "$ESPBRIDGE_PG_BINDIR/postgres=postgresql-15"
      echo "$ESPBRIDGE_PG_BINDIR/initdb=postgresql-15"
      echo "$ESPBRIDGE_PG_BINDIR/pg_ctl=postgresql-15"
      echo "$ESPBRIDGE_PG_BINDIR/psql=postgresql-client-15"
      echo "$ESPBRIDGE_PG_BINDIR/pg_isready=postgresql-client-15"
      ;;
    sftp)
      echo "$ESPBRIDGE_SSHD=openssh-server"
      echo "ssh-keygen=openssh-client"
      echo "sftp=openssh-client"
      ;;
    *) die "unknown component '$1'" ;;
  esac
}

ensure_component_packages() {  # ensure_component_packages NAME...
  local c specs=()
  for c in "$@"; do
    mapfile -t -O "${#specs[@]}" specs < <(component_requirements "$c")
  done
  ensure_packages "${specs[@]}"
}

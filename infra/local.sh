#!/usr/bin/env bash
# infra/local.sh — the espbridge local servers (Kafka, PostgreSQL, SFTP, Kafka Connect) as one unit.
#
#   infra/local.sh up     [component...]   start what is not running; remember what THIS command started
#   infra/local.sh down   [component...]   stop only what `up` started (servers that were already running stay)
#   infra/local.sh status [component...]   one line per server: name address state pid rss; exit 1 if any is down
#   infra/local.sh env                     print $ESPBRIDGE_STATE_DIR/espbridge.env:  eval "$(infra/local.sh env)"
#   infra/local.sh install [component...]  install missing Debian packages and fetch the Kafka and Connect jars; start nothing
#
# Components: kafka postgres sftp connect (default: all; connect needs kafka and postgres, so it starts last).
# Per-component scripts: infra/kafka/kafka-local.sh, infra/postgres/pg-local.sh, infra/sftp/sftp-local.sh,
# infra/connect/connect-local.sh.
#
# Files in $ESPBRIDGE_STATE_DIR (default <repo>/.run, gitignored):
#   started-by-up   components started by `up` and not yet stopped by `down`, one per line
#   espbridge.env   `export` lines for the Python side (written at the end of every successful `up`)
set -euo pipefail

COMPONENT=local
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

ALL_COMPONENTS=(kafka postgres sftp connect)
RECORD="$ESPBRIDGE_STATE_DIR/started-by-up"
ENV_FILE="$ESPBRIDGE_STATE_DIR/espbridge.env"

script_for() {
  case "$1" in
    kafka) echo "$SCRIPT_DIR/kafka/kafka-local.sh" ;;
    postgres) echo "$SCRIPT_DIR/postgres/pg-local.sh" ;;
    sftp) echo "$SCRIPT_DIR/sftp/sftp-local.sh" ;;
    connect) echo "$SCRIPT_DIR/connect/connect-local.sh" ;;
    *) die "unknown component '$1' (known: ${ALL_COMPONENTS[*]})" ;;
  esac
}

# selected components, validated, in canonical order
SELECTED=()
select_components() {
  local c a
  for a in "$@"; do script_for "$a" >/dev/null; done
  for c in "${ALL_COMPONENTS[@]}"; do
    if (($# == 0)); then
      SELECTED+=("$c")
      continue
    fi
    for a in "$@"; do
      if [[ "$a" == "$c" ]]; then
        SELECTED+=("$c")
        break
      fi
    done
  done
}

# ---- the started-by-up record ------------------------------------------------------------------
record_has() { [[ -f "$RECORD" ]] && grep -qx "$1" "$RECORD"; }

record_add() {
  record_has "$1" && return 0
  mkdir -p "$ESPBRIDGE_STATE_DIR"
  printf '%s\n' "$1" >>"$RECORD"
}

record_remove() {
  [[ -f "$RECORD" ]] || return 0
  grep -vx "$1" "$RECORD" >"$RECORD.tmp" || true
  mv "$RECORD.tmp" "$RECORD"
  [[ -s "$RECORD" ]] || rm -f "$RECORD"
}

# ---- env file ----------------------------------------------------------------------------------
write_env_file() {
  local c
  mkdir -p "$ESPBRIDGE_STATE_DIR"
  {
    for c in "${ALL_COMPONENTS[@]}"; do "$(script_for "$c")" env; done
  } >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
  log "wrote $ENV_FILE"
}

# ---- commands ----------------------------------------------------------------------------------
cmd_up() {
  local c script rc t0 t_c started=() already=()
  t0="$(now_us)"
  mkdir -p "$ESPBRIDGE_STATE_DIR"
  # one apt-get update/install for everything that is missing (child scripts then find it all present)
  ensure_component_packages "${SELECTED[@]}"
  for c in "${SELECTED[@]}"; do
    script="$(script_for "$c")"
    rc=0
    "$script" status >/dev/null 2>&1 || rc=$?
    case "$rc" in
      0)
        log "$c already running — left alone (not recorded, \`down\` will not stop it)"
        already+=("$c")
        ;;
      3)
        t_c="$(now_us)"
        "$script" start || die "$c failed to start (already started by this up: ${started[*]:-none}; \`infra/local.sh down\` stops them)"
        record_add "$c"
        started+=("$c")
        log "$c up in $(elapsed_s "$t_c")s"
        ;;
      *)
        log "$c has a process but is not ready; waiting for it (not recorded)"
        "$script" start || die "$c is not healthy"
        already+=("$c")
        ;;
    esac
  done
  write_env_file
  log "up done in $(elapsed_s "$t0")s — started: ${started[*]:-none}; already running: ${already[*]:-none}"
  cmd_status >&2 || true
}

cmd_down() {
  local i c stopped=() kept=()
  for ((i = ${#SELECTED[@]} - 1; i >= 0; i--)); do
    c="${SELECTED[$i]}"
    if record_has "$c"; then
      "$(script_for "$c")" stop || die "$c failed to stop"
      record_remove "$c"
      stopped+=("$c")
    else
      log "$c was not started by \`up\` — leaving it as it is"
      kept+=("$c")
    fi
  done
  log "down done — stopped: ${stopped[*]:-none}; left alone: ${kept[*]:-none}"
}

cmd_status() {
  local c rc=0
  for c in "${SELECTED[@]}"; do
    "$(script_for "$c")" status || rc=1
  done
  return "$rc"
}

cmd_install() {
  local c t0
  t0="$(now_us)"
  ensure_component_packages "${SELECTED[@]}"
  for c in "${SELECTED[@]}"; do
    [[ "$c" == kafka || "$c" == connect ]] && "$(script_for "$c")" fetch
  done
  log "install done in $(elapsed_s "$t0")s"
}

cmd_env() {
  [[ -f "$ENV_FILE" ]] || die "$ENV_FILE does not exist yet — run: infra/local.sh up"
  cat "$ENV_FILE"
}

usage() {
  echo "usage: $0 {up|down|status|install} [kafka|postgres|sftp|connect ...]  |  $0 env" >&2
  exit 2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
select_components "$@"
case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  install) cmd_install ;;
  *) usage ;;
esac

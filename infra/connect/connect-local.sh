#!/usr/bin/env bash
# infra/connect/connect-local.sh — a REAL Apache Kafka Connect worker (distributed mode, one worker,
# loopback only) holding Debezium's PostgreSQL connector, which captures the CRM's crm.subscriptions
# changes for espbridge. Jars come from Maven Central through `mvn dependency:copy-dependencies` on
# the pom.xml beside this script (no Docker, no tarball). espbridge posts the connector's
# configuration itself (`espbridge crm capture enable`, or the syncer at start-up).
#
#   connect-local.sh start | stop | restart | status | fetch | logs [N] | env
#
#   start    fetch jars if needed, write the worker's config and secrets file, launch, wait until REST answers
#   stop     SIGTERM (SIGKILL after the stop timeout), wait until the JVM is gone
#   status   one line: name address state pid rss   (exit 0 running, 1 started-but-not-answering, 3 stopped)
#   fetch    populate the jar cache only
#   logs     the last N lines (default 100) of the worker's log
#   env      print `export ESPBRIDGE_CONNECT_URL=...` and `export ESPBRIDGE_CONNECT_SECRETS_FILE=...`
#
# Versions: Kafka Connect (connect-runtime, connect-json) at the broker's release, 4.2.1
# (ESPBRIDGE_KAFKA_VERSION); Debezium 3.6.1.Final, which is built against Kafka 4.3.0. A connector
# only uses the Connect API, which 4.2.1 serves unchanged: the worker runs 4.2.1, and the Kafka jars
# Debezium brings (4.3.0) are left out of its plugin folder, so only the worker's are ever loaded.
#
# Environment (all optional):
#   ESPBRIDGE_CONNECT_PORT            REST port                                 default 8083
#   ESPBRIDGE_CONNECT_GROUP           the worker group; its internal topics are <group>-{configs,offsets,status}
#                                                                               default espbridge-connect
#   ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS the broker                               default 127.0.0.1:$ESPBRIDGE_KAFKA_PORT (9092)
#   ESPBRIDGE_DEBEZIUM_VERSION        Debezium release                          default 3.6.1.Final
#   ESPBRIDGE_CONNECT_HEAP_OPTS       worker heap                               default -Xms128m -Xmx512m
#   ESPBRIDGE_CONNECT_START_TIMEOUT   seconds to wait for the REST API          default 120
#   ESPBRIDGE_CONNECT_STOP_TIMEOUT    seconds after SIGTERM before SIGKILL      default 30
#   ESPBRIDGE_CONNECT_MVN_ARGS        extra Maven arguments (word-split)
#   ESPBRIDGE_CRM_PASSWORD_FILE, else ESPBRIDGE_PG_PASSWORD_FILE, else $ESPBRIDGE_STATE_DIR/secrets/pg_password
#                                     the CRM database's password, copied into the worker's secrets file
#   ESPBRIDGE_STATE_DIR / ESPBRIDGE_CACHE_DIR   see infra/lib/common.sh
#
# Layout:
#   jars   $ESPBRIDGE_CACHE_DIR/connect/kafka-$KAFKA-debezium-$DEBEZIUM/{worker,plugins/debezium-connector-postgres}/
#          (+ .complete marker; outside the git tree)
#   state  $ESPBRIDGE_STATE_DIR/connect/{config,logs,secrets}/, connect.pid, rss-after-start-kb
#
# The secrets file (mode 600) holds `password=<the CRM's password>` for the worker's
# FileConfigProvider: the posted connector configuration says ${file:<that file>:password}, so the
# password is never in a REST call, the worker's config topic or its logs.
set -euo pipefail

COMPONENT=connect
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

server_settings CONNECT 8083 120 30
KAFKA_VERSION="$ESPBRIDGE_KAFKA_VERSION"
DEBEZIUM_VERSION="$ESPBRIDGE_DEBEZIUM_VERSION"
BOOTSTRAP="${ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS:-$ESPBRIDGE_BIND_HOST:${ESPBRIDGE_KAFKA_PORT:-9092}}"
GROUP="${ESPBRIDGE_CONNECT_GROUP:-espbridge-connect}"
[[ "$GROUP" =~ ^[A-Za-z0-9._-]{1,200}$ ]] || die "ESPBRIDGE_CONNECT_GROUP must be letters, digits, '.', '_' or '-', got '$GROUP'"
HEAP_OPTS="${ESPBRIDGE_CONNECT_HEAP_OPTS:--Xms128m -Xmx512m}"
JVM_OPTS="-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true"

POM="$ESPBRIDGE_INFRA_DIR/connect/pom.xml"
LIB_DIR="$(connect_lib_dir)"
WORKER_LIBS="$LIB_DIR/worker"
PLUGIN_PATH="$LIB_DIR/plugins"
MARKER="$LIB_DIR/.complete"
CSTATE="$ESPBRIDGE_STATE_DIR/connect"
CONF_DIR="$CSTATE/config"
LOG_DIR="$CSTATE/logs"
SECRETS_DIR="$CSTATE/secrets"
SECRETS_FILE="$SECRETS_DIR/crm-postgres.properties"
PID_FILE="$CSTATE/connect.pid"
RSS_FILE="$CSTATE/rss-after-start-kb"
WORKER_PROPS="$CONF_DIR/worker.properties"
CRM_PASSWORD_FILE="${ESPBRIDGE_CRM_PASSWORD_FILE:-${ESPBRIDGE_PG_PASSWORD_FILE:-$ESPBRIDGE_STATE_DIR/secrets/pg_password}}"

# Jars of the connector's dependencies that the worker already has, or that clash with it: Kafka's
# own (Debezium brings 4.3.0 clients and Connect API), SLF4J, the clients' compression codecs, and
# Jackson core (the plugin's own JsonNode breaks the worker's JsonConverter when plugins are scanned).
PLUGIN_EXCLUDED_GROUPS="org.apache.kafka,org.slf4j,com.github.luben,at.yawk.lz4,org.lz4,org.xerial.snappy,com.fasterxml.jackson.core"

if [[ -n "${JAVA_HOME:-}" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA="java"; fi

# ---- prerequisites -----------------------------------------------------------------------------
ensure_java() {
  [[ -n "${JAVA_HOME:-}" ]] || ensure_packages "java=openjdk-17-jre-headless"
  local version
  version="$("$JAVA" -version 2>&1 | sed -E -n '1s/.* version "([0-9]+).*/\1/p')"
  ((${version:-0} >= 17)) || die "Kafka Connect $KAFKA_VERSION needs Java 17+ (found ${version:-none} at $JAVA)"
}

# mvn_copy WHAT DIR [MAVEN ARGS...]: copy one profile's jars into DIR (a fresh folder)
mvn_copy() {
  local what="$1" dir="$2" mvn_log extra=()
  shift 2
  mvn_log="$ESPBRIDGE_CACHE_DIR/connect/mvn-$what.log"
  [[ -z "${ESPBRIDGE_CONNECT_MVN_ARGS:-}" ]] || read -r -a extra <<<"$ESPBRIDGE_CONNECT_MVN_ARGS"
  if ! mvn -B -q -ntp -f "$POM" "${extra[@]}" "$@" -Dkafka.version="$KAFKA_VERSION" \
    -Ddebezium.version="$DEBEZIUM_VERSION" -Dconnect.lib.dir="$dir" \
    dependency:copy-dependencies >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    return 1
  fi
}

# ---- jar cache (Maven runs once per version pair; concurrent callers serialise on a lock) -------
ensure_libs() {
  [[ -f "$MARKER" ]] && return 0
  mkdir -p "$ESPBRIDGE_CACHE_DIR/connect"
  local lock="$LIB_DIR.lock"
  exec 9>"$lock"
  flock -w 900 9 || die "timed out waiting for another fetch of the Connect jars ($lock)"
  if [[ -f "$MARKER" ]]; then exec 9>&-; return 0; fi

  ensure_packages "mvn=maven"
  [[ -f "$POM" ]] || die "pom not found: $POM"
  local tmp="$LIB_DIR.partial" t0
  rm -rf "$tmp" "$LIB_DIR"
  log "fetching Kafka Connect $KAFKA_VERSION and Debezium $DEBEZIUM_VERSION jars from Maven Central into $LIB_DIR (one-time)"
  t0="$(now_us)"
  mvn_copy worker "$tmp/worker" || { rm -rf "$tmp"; die "fetching the worker's jars failed"; }
  mvn_copy debezium "$tmp/plugins/debezium-connector-postgres" -Pdebezium \
    -DexcludeGroupIds="$PLUGIN_EXCLUDED_GROUPS" || { rm -rf "$tmp"; die "fetching the Debezium connector's jars failed"; }
  local jar
  for jar in "worker/connect-runtime-$KAFKA_VERSION.jar" "worker/connect-json-$KAFKA_VERSION.jar" \
    "plugins/debezium-connector-postgres/debezium-connector-postgres-$DEBEZIUM_VERSION.jar"; do
    [[ -f "$tmp/$jar" ]] || { rm -rf "$tmp"; die "$jar missing after fetch"; }
  done
  compgen -G "$tmp/plugins/debezium-connector-postgres/postgresql-*.jar" >/dev/null ||
    { rm -rf "$tmp"; die "the PostgreSQL JDBC driver is missing from the plugin folder after fetch"; }
  mv "$tmp" "$LIB_DIR"
  local jars mb secs
  jars="$(find "$LIB_DIR" -name '*.jar' | wc -l)"
  mb="$(du -sm "$LIB_DIR" | cut -f1)"
  secs="$(elapsed_s "$t0")"
  printf 'kafka=%s\ndebezium=%s\njars=%s\nsize_mb=%s\nfetch_seconds=%s\n' \
    "$KAFKA_VERSION" "$DEBEZIUM_VERSION" "$jars" "$mb" "$secs" >"$MARKER"
  exec 9>&-
  log "fetched $jars jars ($mb MB) in ${secs}s"
}

# ---- configuration (rewritten on every start) --------------------------------------------------
write_secrets() {
  [[ -r "$CRM_PASSWORD_FILE" ]] ||
    die "no CRM database password file at $CRM_PASSWORD_FILE (start PostgreSQL first: infra/local.sh up postgres)"
  local pw
  pw="$(<"$CRM_PASSWORD_FILE")"
  pw="${pw%$'\r'}"
  [[ -n "$pw" && "$pw" != *$'\n'* ]] || die "password file $CRM_PASSWORD_FILE must hold one non-empty line"
  pw="${pw//\\/\\\\}" # a .properties value: backslashes escaped
  (
    umask 077
    mkdir -p "$SECRETS_DIR"
    printf 'password=%s\n' "$pw" >"$SECRETS_FILE.tmp"
  )
  chmod 700 "$SECRETS_DIR"
  chmod 600 "$SECRETS_FILE.tmp"
  mv "$SECRETS_FILE.tmp" "$SECRETS_FILE"
}

write_configs() {
  mkdir -p "$CONF_DIR" "$LOG_DIR"
  cat >"$WORKER_PROPS.tmp" <<EOF
# Generated by infra/connect/connect-local.sh on every start — edit the script, not this file.
# One distributed-mode worker, loopback only; espbridge posts its connectors over REST.
bootstrap.servers=$BOOTSTRAP
group.id=$GROUP
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
# the worker's own topics, created by the worker (the broker creates no topic on its own)
config.storage.topic=$GROUP-configs
offset.storage.topic=$GROUP-offsets
status.storage.topic=$GROUP-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=1
status.storage.partitions=1
# a source's position (Debezium: the LSN it confirms to its replication slot) is committed every
# 2 s: after a crash at most that much is read again (consumers dedupe), and the slot's WAL is freed
offset.flush.interval.ms=2000
# one worker: a task of a worker that died is given out again at once, not after 5 minutes; and a
# worker restarted after a crash joins its group once the dead one's session ends (the broker's
# shortest session, 6 s, not 10 s)
scheduled.rebalance.max.delay.ms=0
session.timeout.ms=6000
heartbeat.interval.ms=2000
listeners=http://$HOST:$PORT
rest.advertised.host.name=$HOST
rest.advertised.port=$PORT
plugin.path=$PLUGIN_PATH
# every plugin has ServiceLoader manifests: no classpath scan (2.5x faster start, half the memory)
plugin.discovery=service_load
# connector configs name \${file:<path>:<key>}: secrets stay in files, out of REST calls and topics
config.providers=file
config.providers.file.class=org.apache.kafka.common.config.provider.FileConfigProvider
EOF
  mv "$WORKER_PROPS.tmp" "$WORKER_PROPS"
  cat >"$CONF_DIR/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="FILE" fileName="$LOG_DIR/connect.log" filePattern="$LOG_DIR/connect.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <!-- every client the worker creates logs its whole configuration at INFO -->
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common" level="WARN"/>
    <Logger name="org.apache.kafka.connect.runtime.distributed" level="INFO"/>
    <Root level="INFO"><AppenderRef ref="FILE"/></Root>
  </Loggers>
</Configuration>
EOF
}

# ---- process -----------------------------------------------------------------------------------
current_pid() { read_pid_file "$PID_FILE"; }

# our worker = live pid from our pid file whose command line is ConnectDistributed with OUR config
is_running() {
  local pid
  pid="$(current_pid)"
  pid_alive "$pid" && pid_cmdline_has "$pid" "ConnectDistributed $WORKER_PROPS"
}

# rest_ok PATH -> 0 when GET http://HOST:PORT/PATH answers 200 (plain bash: no curl needed); the
# worker answers 503 on /connectors until it has joined its group and read its config topic
rest_ok() {
  local line
  line="$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/$HOST/$PORT" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" "$ADDRESS" >&3
    IFS= read -r -t 5 line <&3 && printf '%s' "$line"
  )" || true
  [[ "$line" == "HTTP/1."?" 200"* ]]
}

accepting() { rest_ok /connectors; }

dump_logs() {
  log "---- tail $LOG_DIR/connect.out"
  tail -n 30 "$LOG_DIR/connect.out" >&2 2>/dev/null || true
  log "---- tail $LOG_DIR/connect.log"
  tail -n 30 "$LOG_DIR/connect.log" >&2 2>/dev/null || true
}

cmd_start() {
  mkdir -p "$CSTATE"
  already_started worker && return 0
  rm -f "$PID_FILE" "$RSS_FILE"
  port_open "$HOST" "$PORT" && die "port $PORT on $HOST is in use by another process"
  local t_total
  t_total="$(now_us)"
  ensure_java
  ensure_libs
  write_secrets
  write_configs

  local heap=() jvm=() t0 pid
  read -r -a heap <<<"$HEAP_OPTS"
  read -r -a jvm <<<"$JVM_OPTS"
  log "starting Kafka Connect $KAFKA_VERSION with Debezium $DEBEZIUM_VERSION on http://$ADDRESS (Kafka $BOOTSTRAP, logs $LOG_DIR)"
  t0="$(now_us)"
  # setsid: own session, so a Ctrl-C / process-group kill aimed at the caller does not hit the worker
  setsid nohup "$JAVA" "${heap[@]}" "${jvm[@]}" -Dlog4j2.configurationFile="$CONF_DIR/log4j2.xml" \
    -cp "$WORKER_LIBS/*" org.apache.kafka.connect.cli.ConnectDistributed "$WORKER_PROPS" \
    >>"$LOG_DIR/connect.out" 2>&1 </dev/null &
  pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  if ! wait_started "$pid" "$t0" "the worker's REST API"; then
    dump_logs
    die "worker exited during startup"
  fi
  log "start took $(elapsed_s "$t_total")s in total (including the fetch when needed)"
}

cmd_stop() { stop_server " (SIGTERM: the worker stops its tasks and commits their offsets)"; }

cmd_status() { server_status "$(current_pid)" accepting; }

cmd_env() {
  printf 'export ESPBRIDGE_CONNECT_URL=%s\n' "http://$ADDRESS"
  printf 'export ESPBRIDGE_CONNECT_SECRETS_FILE=%q\n' "$SECRETS_FILE"
}

usage() {
  echo "usage: $0 {start|stop|restart|status|fetch|logs [N]|env}" >&2
  exit 2
}

other_command() {
  case "${1:-}" in
    fetch)
      ensure_java
      ensure_libs
      log "$(tr '\n' ' ' <"$MARKER")-> $LIB_DIR"
      ;;
    logs)
      tail -n "${2:-100}" "$LOG_DIR/connect.log"
      ;;
    *) usage ;;
  esac
}

run_server_command "$@"

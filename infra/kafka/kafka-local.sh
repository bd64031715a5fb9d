#!/usr/bin/env bash
# infra/kafka/kafka-local.sh — a REAL single-node Apache Kafka broker (KRaft, combined broker+controller,
# loopback only) for espbridge development and tests. Jars come from Maven Central through
# `mvn dependency:copy-dependencies` on the pom.xml beside this script (no Docker, no tarball).
#
#   kafka-local.sh start | stop | restart | status | fetch | logs [N] | topics [TopicCommand args...]
#   kafka-local.sh tool <main.Class> [args...] | classpath | env | reset
#
#   start    fetch jars if needed, write config, format storage once, launch, wait until the client port accepts
#   status   one line: name address state pid rss   (exit 0 running, 1 started-but-not-accepting, 3 stopped)
#   fetch    populate the jar cache only
#   topics   org.apache.kafka.tools.TopicCommand with --bootstrap-server filled in, e.g. `topics --list`
#   reset    stop and delete data + logs (config is regenerated on the next start)
#   env      print `export ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS=...`
#
# Environment (all optional):
#   ESPBRIDGE_KAFKA_VERSION          Kafka release                          default 4.2.1
#   ESPBRIDGE_KAFKA_PORT             client (PLAINTEXT) port                default 9092
#   ESPBRIDGE_KAFKA_CONTROLLER_PORT  KRaft controller port                  default 9093
#   ESPBRIDGE_KAFKA_HEAP_OPTS        broker heap                            default -Xms256m -Xmx768m
#   ESPBRIDGE_KAFKA_JVM_OPTS         broker GC/JVM flags                    default G1 flags of kafka-run-class.sh
#   ESPBRIDGE_KAFKA_TOOL_OPTS        JVM flags of StorageTool/TopicCommand  default small heap, C1 only
#   ESPBRIDGE_KAFKA_START_TIMEOUT    seconds to wait for the port           default 120
#   ESPBRIDGE_KAFKA_STOP_TIMEOUT     seconds after SIGTERM before SIGKILL   default 30
#   ESPBRIDGE_KAFKA_MVN_ARGS         extra Maven arguments (word-split)
#   ESPBRIDGE_STATE_DIR / ESPBRIDGE_CACHE_DIR   see infra/lib/common.sh
#
# Layout:
#   jars   $ESPBRIDGE_CACHE_DIR/kafka/lib-$VERSION/   (+ .complete marker; outside the git tree)
#   state  $ESPBRIDGE_STATE_DIR/kafka/{config,data,logs}/, kafka.pid, rss-after-start-kb
set -euo pipefail

COMPONENT=kafka
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

server_settings KAFKA 9092 120 30
KAFKA_CONTROLLER_PORT="${ESPBRIDGE_KAFKA_CONTROLLER_PORT:-9093}"
require_port ESPBRIDGE_KAFKA_CONTROLLER_PORT "$KAFKA_CONTROLLER_PORT"
[[ "$PORT" != "$KAFKA_CONTROLLER_PORT" ]] || die "client and controller port must differ"
KAFKA_VERSION="$ESPBRIDGE_KAFKA_VERSION"
HEAP_OPTS="${ESPBRIDGE_KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
JVM_OPTS="${ESPBRIDGE_KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}"
TOOL_OPTS="${ESPBRIDGE_KAFKA_TOOL_OPTS:--Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true}"

POM="$ESPBRIDGE_INFRA_DIR/kafka/pom.xml"
LIB_DIR="$(kafka_lib_dir)"
MARKER="$LIB_DIR/.complete"
KSTATE="$ESPBRIDGE_STATE_DIR/kafka"
CONF_DIR="$KSTATE/config"
DATA_DIR="$KSTATE/data"
LOG_DIR="$KSTATE/logs"
PID_FILE="$KSTATE/kafka.pid"
RSS_FILE="$KSTATE/rss-after-start-kb"
SERVER_PROPS="$CONF_DIR/server.properties"

if [[ -n "${JAVA_HOME:-}" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA="java"; fi

# ---- prerequisites -----------------------------------------------------------------------------
java_major() {
  "$JAVA" -version 2>&1 | sed -E -n 's/.* version "([0-9]+)(\.([0-9]+))?.*/\1 \3/p' | head -n 1 |
    awk '{ if ($1 == 1) print $2; else print $1 }'
}

ensure_java() {
  if [[ -z "${JAVA_HOME:-}" ]]; then ensure_packages "java=openjdk-17-jre-headless"; fi
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found ($JAVA)"
  local major
  major="$(java_major)"
  if [[ "${KAFKA_VERSION%%.*}" -ge 4 && "${major:-0}" -lt 17 ]]; then
    die "Kafka $KAFKA_VERSION needs Java 17+ (found ${major:-unknown}); install openjdk-17-jre-headless or set JAVA_HOME"
  fi
}

# log4j2 version used by each Kafka release (gradle/dependencies.gradle); 3.x uses reload4j via kafka-tools
maven_profile_args() {
  case "$KAFKA_VERSION" in
    3.*) echo "-Pkafka39" ;;
    4.0.0 | 4.0.1 | 4.1.0 | 4.1.1) echo "-Dlog4j2.version=2.24.3" ;;
    4.0.2 | 4.1.2 | 4.2.0) echo "-Dlog4j2.version=2.25.3" ;;
    4.2.1) echo "-Dlog4j2.version=2.25.4" ;;
    *) echo "" ;; # unknown release: pom default
  esac
}

# ---- jar cache (Maven runs once per version; concurrent callers serialise on a lock) -----------
ensure_libs() {
  [[ -f "$MARKER" ]] && return 0
  mkdir -p "$ESPBRIDGE_CACHE_DIR/kafka"
  local lock="$ESPBRIDGE_CACHE_DIR/kafka/.lib-$KAFKA_VERSION.lock"
  exec 9>"$lock"
  flock -w 900 9 || die "timed out waiting for another fetch of Kafka $KAFKA_VERSION ($lock)"
  if [[ -f "$MARKER" ]]; then exec 9>&-; return 0; fi

  ensure_packages "mvn=maven"
  [[ -f "$POM" ]] || die "pom not found: $POM"
  local tmp="$LIB_DIR.partial" mvn_log="$ESPBRIDGE_CACHE_DIR/kafka/mvn-$KAFKA_VERSION.log" t0 profile
  local extra=() margs=()
  rm -rf "$tmp" "$LIB_DIR"
  profile="$(maven_profile_args)"
  [[ -z "$profile" ]] || margs+=("$profile")
  [[ -z "${ESPBRIDGE_KAFKA_MVN_ARGS:-}" ]] || read -r -a extra <<<"$ESPBRIDGE_KAFKA_MVN_ARGS"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIB_DIR (one-time; log: $mvn_log)"
  t0="$(now_us)"
  if ! mvn -B -q -ntp -f "$POM" "${margs[@]}" "${extra[@]}" \
    -Dkafka.version="$KAFKA_VERSION" -Dkafka.lib.dir="$tmp" \
    dependency:copy-dependencies >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (see $mvn_log)"
  fi
  compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null || { rm -rf "$tmp"; die "kafka_2.13-$KAFKA_VERSION.jar missing after fetch"; }
  compgen -G "$tmp/kafka-tools-$KAFKA_VERSION.jar" >/dev/null || { rm -rf "$tmp"; die "kafka-tools-$KAFKA_VERSION.jar missing after fetch"; }
  mv "$tmp" "$LIB_DIR"
  local jars mb secs
  jars="$(find "$LIB_DIR" -maxdepth 1 -name '*.jar' | wc -l)"
  mb="$(du -sm "$LIB_DIR" | cut -f1)"
  secs="$(elapsed_s "$t0")"
  printf 'version=%s\njars=%s\nsize_mb=%s\nfetch_seconds=%s\n' "$KAFKA_VERSION" "$jars" "$mb" "$secs" >"$MARKER"
  exec 9>&-
  log "fetched $jars jars ($mb MB) in ${secs}s"
}

# log4j2 (Kafka 4.x) vs reload4j/log4j1 (3.x), decided by the jars actually present
log_opts() { # $1 = server|tool
  if compgen -G "$LIB_DIR/log4j-core-*.jar" >/dev/null; then
    echo "-Dlog4j2.configurationFile=$CONF_DIR/log4j2-$1.xml"
  else
    echo "-Dlog4j.configuration=file:$CONF_DIR/log4j-$1.properties"
  fi
}

# ---- configuration (rewritten on every start/tool call; data stays) ----------------------------
write_configs() {
  mkdir -p "$CONF_DIR" "$DATA_DIR" "$LOG_DIR"
  cat >"$SERVER_PROPS.tmp" <<EOF
# Generated by infra/kafka/kafka-local.sh on every start — edit the script, not this file.
# Single node, KRaft combined mode (broker + controller), loopback only.
process.roles=broker,controller
node.id=1
# static quorum: the voter comes from this file, so changing the controller port needs no re-format
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
# espbridge creates its topics explicitly
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
# internal topics: RF 1 (single broker), few partitions => fast first coordinator load
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# after a crash (kill -9) the restarted broker can only register once the controller has expired the
# old registration: a shorter session (default 9 s, heartbeat 2 s) shortens that restart
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
# small footprint (2-core dev machine)
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.cleaner.dedupe.buffer.size=2097152
log.retention.hours=24
EOF
  mv "$SERVER_PROPS.tmp" "$SERVER_PROPS"
  local pat='[%d] %p %m (%c)%n'
  cat >"$CONF_DIR/log4j2-server.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="FILE" fileName="\${sys:kafka.logs.dir:-.}/server.log" append="true">
      <PatternLayout pattern="$pat"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.Kafka" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="FILE"/></Root>
  </Loggers>
</Configuration>
EOF
  cat >"$CONF_DIR/log4j2-tool.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDERR" target="SYSTEM_ERR"><PatternLayout pattern="$pat"/></Console>
  </Appenders>
  <Loggers><Root level="WARN"><AppenderRef ref="STDERR"/></Root></Loggers>
</Configuration>
EOF
  cat >"$CONF_DIR/log4j-server.properties" <<EOF
log4j.rootLogger=WARN, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File=\${kafka.logs.dir}/server.log
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=$pat
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.Kafka=INFO
EOF
  cat >"$CONF_DIR/log4j-tool.properties" <<EOF
log4j.rootLogger=WARN, STDERR
log4j.appender.STDERR=org.apache.log4j.ConsoleAppender
log4j.appender.STDERR.Target=System.err
log4j.appender.STDERR.layout=org.apache.log4j.PatternLayout
log4j.appender.STDERR.layout.ConversionPattern=$pat
EOF
}

run_tool() { # run_tool MAIN_CLASS ARGS... — same classpath as the broker, WARN+ to stderr
  local main="$1" opts=()
  shift
  read -r -a opts <<<"$TOOL_OPTS"
  "$JAVA" "${opts[@]}" -Dkafka.logs.dir="$LOG_DIR" "$(log_opts tool)" -cp "$LIB_DIR/*" "$main" "$@"
}

# 22-char URL-safe base64 of 16 random bytes = a Kafka Uuid string (same as `StorageTool random-uuid`,
# without paying for a JVM start). Kafka rejects ids starting with '-'.
random_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" == -* || "$id" == "AAAAAAAAAAAAAAAAAAAAAA" || "$id" == "AAAAAAAAAAAAAAAAAAAAAQ" ]] || break
  done
  printf '%s\n' "$id"
}

format_storage() {
  [[ -f "$DATA_DIR/meta.properties" ]] && return 0
  local cid t0
  cid="$(random_cluster_id)"
  t0="$(now_us)"
  log "formatting $DATA_DIR (cluster.id=$cid)"
  run_tool kafka.tools.StorageTool format -t "$cid" -c "$SERVER_PROPS" >"$LOG_DIR/format.out" 2>&1 ||
    { cat "$LOG_DIR/format.out" >&2; die "storage format failed"; }
  log "formatted in $(elapsed_s "$t0")s"
}

# ---- process -----------------------------------------------------------------------------------
current_pid() { read_pid_file "$PID_FILE"; }

# our broker = live pid from our pid file whose command line is kafka.Kafka with OUR server.properties
is_running() {
  local pid
  pid="$(current_pid)"
  pid_alive "$pid" && pid_cmdline_has "$pid" "kafka.Kafka $SERVER_PROPS"
}

dump_logs() {
  log "---- tail $LOG_DIR/kafka.out"
  tail -n 30 "$LOG_DIR/kafka.out" >&2 2>/dev/null || true
  log "---- tail $LOG_DIR/server.log"
  tail -n 30 "$LOG_DIR/server.log" >&2 2>/dev/null || true
}

# the PLAINTEXT acceptor opens only once the broker has caught up with the metadata log and is
# unfenced, so "accepts" == "ready"
accepting() { port_open "$HOST" "$PORT"; }

cmd_start() {
  mkdir -p "$KSTATE"
  already_started broker && return 0
  rm -f "$PID_FILE" "$RSS_FILE"
  if port_open "$HOST" "$PORT" || port_open "$HOST" "$KAFKA_CONTROLLER_PORT"; then
    die "port $PORT or $KAFKA_CONTROLLER_PORT on $HOST is in use by another process"
  fi
  local t_total
  t_total="$(now_us)"
  ensure_java
  ensure_libs
  write_configs
  format_storage

  local heap=() jvm=() t0 pid
  read -r -a heap <<<"$HEAP_OPTS"
  read -r -a jvm <<<"$JVM_OPTS"
  log "starting Kafka $KAFKA_VERSION on $ADDRESS (controller $HOST:$KAFKA_CONTROLLER_PORT, logs $LOG_DIR)"
  t0="$(now_us)"
  # setsid: own session, so a Ctrl-C / process-group kill aimed at the caller does not hit the broker
  setsid nohup "$JAVA" "${heap[@]}" "${jvm[@]}" -Dkafka.logs.dir="$LOG_DIR" "$(log_opts server)" \
    -cp "$LIB_DIR/*" kafka.Kafka "$SERVER_PROPS" >>"$LOG_DIR/kafka.out" 2>&1 </dev/null &
  pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  if ! wait_started "$pid" "$t0" broker; then
    dump_logs
    die "broker exited during startup"
  fi
  log "start took $(elapsed_s "$t_total")s in total (including fetch/format when needed)"
}

cmd_stop() { stop_server " (SIGTERM = controlled shutdown)"; }

cmd_status() { server_status "$(current_pid)" accepting; }

cmd_env() {
  printf 'export ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS=%s\n' "$ADDRESS"
}

usage() {
  echo "usage: $0 {start|stop|restart|status|fetch|logs [N]|topics [args]|tool <Class> [args]|classpath|env|reset}" >&2
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
      tail -n "${2:-100}" "$LOG_DIR/server.log" "$LOG_DIR/kafka.out"
      ;;
    topics)
      shift
      accepting || die "no broker on $ADDRESS (start it with: $0 start)"
      ensure_java
      ensure_libs
      write_configs
      run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$ADDRESS" "$@"
      ;;
    tool)
      shift
      [[ $# -ge 1 ]] || usage
      ensure_java
      ensure_libs
      write_configs
      run_tool "$@"
      ;;
    classpath)
      ensure_libs
      echo "$LIB_DIR/*"
      ;;
    reset)
      cmd_stop
      rm -rf "$DATA_DIR" "$LOG_DIR" "$RSS_FILE"
      log "data and logs removed"
      ;;
    *) usage ;;
  esac
}

run_server_command "$@"

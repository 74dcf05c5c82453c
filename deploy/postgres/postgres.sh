#!/usr/bin/env bash
# Local PostgreSQL for development and CI: its own cluster (not the Debian-managed one), listening
# on 127.0.0.1 only, with role bookstore/bookstore and databases bookstore and bookstore_test.
# Installs PostgreSQL from Debian packages when no server binaries are found. As root, the server
# runs as the `postgres` OS user.
#
# Usage: deploy/postgres/postgres.sh start|stop|restart|status
#
# Environment:
#   PGPORT               port on 127.0.0.1 (default 5432)
#   BOOKSTORE_STATE_DIR  state root (default <repo>/.local); cluster and log in postgres/. If the
#                        postgres user cannot reach it, /var/lib/postgresql/bookstore-<hash> is used.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE_ROOT="${BOOKSTORE_STATE_DIR:-$REPO/.local}"
PORT="${PGPORT:-5432}"
SOCKET_DIR=/tmp
URL_BASE="postgres://bookstore:bookstore@127.0.0.1:$PORT"

say() { echo "postgres.sh: $*"; }
die() { echo "postgres.sh: $*" >&2; exit 1; }
usage() { echo "usage: $0 start|stop|restart|status" >&2; exit 2; }

# Run a command as the cluster owner (the postgres OS user when we are root).
as_pg() {
  if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The superuser of a cluster this script creates: the OS user that runs it (postgres under root,
# else the caller), so that peer authentication on the Unix socket lets as_pg in.
if [[ $EUID -eq 0 ]]; then SUPERUSER=postgres; else SUPERUSER="$(id -un)"; fi

# Newest /usr/lib/postgresql/<version>/bin with a server in it.
find_bin() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] && best="$(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n 1)"
  done
  [[ -n "$best" ]] && echo "$best"
}

install_pg() {
  [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed; run as root or: apt-get install -y postgresql"
  say "installing PostgreSQL from Debian packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

# Where the cluster lives: under the state dir when the postgres user can reach it, else a
# per-state-dir folder in the postgres user's home.
pick_root() {
  local root="$STATE_ROOT/postgres"
  mkdir -p "$STATE_ROOT"
  if [[ $EUID -eq 0 ]]; then
    chmod o+x "$STATE_ROOT"
    if ! as_pg test -x "$STATE_ROOT"; then
      root="/var/lib/postgresql/bookstore-$(echo "$STATE_ROOT" | sha256sum | cut -c1-12)"
    fi
  fi
  echo "$root"
}

BIN="$(find_bin || true)"
PG_ROOT="$(pick_root)"
DATA="$PG_ROOT/data"
LOG="$PG_ROOT/postgres.log"

ours_running() { [[ -n "$BIN" && -f "$DATA/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }
answers() { "${BIN:+$BIN/}pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2 2>/dev/null; }

# Superuser psql (SQL on stdin) through a Unix socket with peer authentication: ours in /tmp,
# a Debian-managed one in /var/run/postgresql. Returns 3 when neither lets us in.
su_psql() {
  local dir user
  for dir in "$SOCKET_DIR" /var/run/postgresql; do
    for user in "$SUPERUSER" postgres; do
      if as_pg "$BIN/psql" -h "$dir" -p "$PORT" -U "$user" -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
        as_pg "$BIN/psql" -h "$dir" -p "$PORT" -U "$user" -d postgres -v ON_ERROR_STOP=1 -q
        return
      fi
    done
  done
  return 3
}

ensure_role_and_dbs() {
  local rc=0
  su_psql <<'SQL' || rc=$?
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bookstore') THEN
    CREATE ROLE bookstore LOGIN CREATEDB PASSWORD 'bookstore';
  ELSE
    ALTER ROLE bookstore LOGIN CREATEDB PASSWORD 'bookstore';
  END IF;
END $$;
SELECT 'CREATE DATABASE bookstore OWNER bookstore' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'bookstore')\gexec
SELECT 'CREATE DATABASE bookstore_test OWNER bookstore' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'bookstore_test')\gexec
SQL
  if [[ $rc -eq 3 ]]; then
    # Not reachable as superuser: at least check that the test database works.
    PGPASSWORD=bookstore "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U bookstore -d bookstore_test -Atqc 'select 1' >/dev/null 2>&1 ||
      die "the server on port $PORT is not ours and has no working bookstore/bookstore_test; set PGPORT to a free port"
    say "not superuser on that server; role bookstore and database bookstore_test already work"
  elif [[ $rc -ne 0 ]]; then
    die "could not create role/databases (psql exit $rc)"
  fi
}

print_urls() {
  say "DATABASE_URL=$URL_BASE/bookstore"
  say "BOOKSTORE_TEST_DATABASE_URL=$URL_BASE/bookstore_test"
}

start() {
  if [[ -z "$BIN" ]]; then
    install_pg
    BIN="$(find_bin)" || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin after install"
    # Chosen again now that the postgres user exists: chosen without it, the folder would
    # differ from the one every later run (and so `stop`) picks.
    PG_ROOT="$(pick_root)"
    DATA="$PG_ROOT/data"
    LOG="$PG_ROOT/postgres.log"
  fi
  if ours_running; then
    say "already running (data $DATA, port $PORT)"
  elif answers; then
    say "a PostgreSQL server not started by this script already answers on 127.0.0.1:$PORT; using it"
  else
    mkdir -p "$PG_ROOT"
    [[ $EUID -eq 0 ]] && chown postgres:postgres "$PG_ROOT"
    if [[ ! -f "$DATA/PG_VERSION" ]]; then
      say "creating cluster in $DATA ($("$BIN/postgres" --version))"
      as_pg "$BIN/initdb" -D "$DATA" -U "$SUPERUSER" -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >"$PG_ROOT/initdb.log" 2>&1 ||
        { cat "$PG_ROOT/initdb.log"; die "initdb failed"; }
      as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<'CONF'

# bookstore (deploy/postgres/postgres.sh); port and addresses are given on the command line.
max_connections = 200
fsync = on
log_min_messages = warning
log_connections = off
CONF
    fi
    say "starting PostgreSQL on 127.0.0.1:$PORT (data $DATA)"
    as_pg "$BIN/pg_ctl" start -w -t 60 -D "$DATA" -l "$LOG" \
      -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$SOCKET_DIR" >/dev/null ||
      { tail -n 40 "$LOG" 2>/dev/null; die "pg_ctl start failed (log: $LOG)"; }
    say "log: $LOG"
  fi
  ensure_role_and_dbs
  print_urls
}

stop() {
  if ! ours_running; then
    say "not running (no cluster of ours in $DATA)"
    return 0
  fi
  as_pg "$BIN/pg_ctl" stop -w -m fast -D "$DATA" >/dev/null
  say "stopped"
}

status() {
  if ours_running && answers; then
    say "running on 127.0.0.1:$PORT (data $DATA)"
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

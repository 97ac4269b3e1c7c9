#!/usr/bin/env bash
# Starts a private PostgreSQL for the ledger tests (installing it with apt when
# missing) and prints its URL. Idempotent: a running one is reused.
#   QPAI_TEST_PG_DIR   data directory (default /var/tmp/qpai-postgres: outside
#                      /root, which the postgres user cannot enter)
#   QPAI_TEST_PG_PORT  port on 127.0.0.1 (default 55432)
set -euo pipefail

dir="${QPAI_TEST_PG_DIR:-/var/tmp/qpai-postgres}"
port="${QPAI_TEST_PG_PORT:-55432}"
url="postgres://postgres@127.0.0.1:$port/qpai_test"

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "== installing PostgreSQL" >&2
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi

# PostgreSQL refuses to run as root: run it as the `postgres` user then.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  if [ ! -f "$dir/PG_VERSION" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_owner "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >&2
  fi
  as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >&2
fi
if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'qpai_test'" | grep -q 1; then
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres qpai_test
fi
echo "$url"

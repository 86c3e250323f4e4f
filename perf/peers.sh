#!/usr/bin/env bash
# Peers a user might pick instead of tradeid, measured on this machine next
# to tradeid in one run. Installs Redis and PostgreSQL from Debian packages
# (needs root and the Debian mirror), runs everything on loopback, and
# removes nothing it did not start. The protocols differ (RESP over TCP,
# SQL over TCP, tradeid over UDP): the numbers compare what each service
# delivers per second on this hardware, not equal work.
#
# Usage (from the repository root; it builds the release binaries first):
#   bash perf/peers.sh [SECONDS]
set -euo pipefail
SECONDS_PER_RUN=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/tradeid-peers.XXXXXX)
chmod 755 "$WORK" # PostgreSQL runs as its own user
group() { python3 -c 'import sys; print(f"{float(sys.argv[1]):,.0f}")' "$1"; }
trap 'jobs -p | xargs -r kill 2>/dev/null; [ -n "${PGDATA:-}" ] && su postgres -c "$PGBIN/pg_ctl -D $PGDATA stop -m immediate" >/dev/null 2>&1; rm -rf "$WORK"' EXIT

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null || ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools postgresql >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
(cd "$ROOT" && cargo build --release --workspace --quiet)
REQUESTS=$((SECONDS_PER_RUN * 150000))

echo "| service | configuration | ops/s | notes |"
echo "|---|---|---|---|"

# tradeid, single ID, same client concurrency as the peers (4 sockets x 16).
"$ROOT/target/release/tradeid" init --state "$WORK/t.state" >/dev/null
"$ROOT/target/release/tradeid" serve --state "$WORK/t.state" --listen 127.0.0.1:0 --workers 1 --cpus 1 >"$WORK/t.out" 2>/dev/null &
for _ in $(seq 50); do grep -q '^listening' "$WORK/t.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/^listening on //p' "$WORK/t.out")
for batch in 1 16; do
    rps=$("$ROOT/target/release/loadgen" --target "$ADDR" --duration "$SECONDS_PER_RUN" --sockets 4 --window 16 --cpus 0 --batch $batch --quiet --json - \
        | python3 -c 'import sys,json; print(json.load(sys.stdin)["ids_per_second"])')
    echo "| tradeid | UDP, batch $batch, 4 sockets x 16, 1 worker | $(group "$rps") IDs/s | durable (msync per block) |"
done
kill %1; wait %1 2>/dev/null || true

# Redis INCR.
redis_run() { # $1 = label, rest = redis-server options
    local label=$1; shift
    redis-server --port 6390 --bind 127.0.0.1 --dir "$WORK" --save '' --daemonize no "$@" >/dev/null &
    local pid=$!
    for _ in $(seq 50); do redis-cli -p 6390 ping >/dev/null 2>&1 && break; sleep 0.1; done
    for pipeline in 1 16; do
        rps=$(taskset -c 0 redis-benchmark -p 6390 -c 64 -n $REQUESTS -P $pipeline -t incr -q --csv | tail -1 | cut -d, -f2 | tr -d '"')
        echo "| Redis INCR | $label, pipeline $pipeline, 64 clients | $(group "$rps") | $( [ "$label" = "appendfsync always" ] && echo "durable per write" || echo "not durable" ) |"
    done
    kill $pid; wait $pid 2>/dev/null || true
}
redis_run "no persistence" --appendonly no
redis_run "appendfsync always" --appendonly yes --appendfsync always

# PostgreSQL nextval.
PGDATA="$WORK/pg"
install -d -o postgres "$PGDATA" "$WORK/pglog"
su postgres -c "$PGBIN/initdb -D $PGDATA -A trust" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $PGDATA -o '-p 5499 -k /tmp -c listen_addresses=127.0.0.1' -l $WORK/pglog/pg.log start -w" >/dev/null
psql -h 127.0.0.1 -p 5499 -U postgres -qc 'CREATE SEQUENCE ids CACHE 1' >/dev/null
echo "SELECT nextval('ids');" > "$WORK/nextval.sql"
chmod 644 "$WORK/nextval.sql"
for clients in 4 16; do
    tps=$(taskset -c 0 "$PGBIN/pgbench" -h 127.0.0.1 -p 5499 -U postgres -n -M prepared -c $clients -j 1 -T "$SECONDS_PER_RUN" -f "$WORK/nextval.sql" postgres \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "| PostgreSQL nextval | $clients clients, prepared, CACHE 1 | $(group "$tps") | durable only via later commits |"
done

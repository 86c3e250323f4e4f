#!/usr/bin/env bash
# Checks the shipped unit files: `systemd-analyze verify` must print nothing
# (it exits 0 even on unknown keys, so any output fails), the offline
# security exposure must be at most 2.0, and `tradeid serve --check-config`
# must accept the settings each unit passes. Needs /usr/local/bin/tradeid
# (the path the units use) and systemd-analyze.
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXPOSURE=2.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0

check_unit() { # $1 = unit file to check, $2 = env file of settings (or "")
    local unit=$1 envfile=$2 name
    name=$(basename "$unit")
    local out
    out=$(systemd-analyze verify "$unit" 2>&1) || true
    if [ -n "$out" ]; then
        echo "FAIL: systemd-analyze verify $name printed:"; echo "$out"; status=1
    else
        echo "ok: verify $name"
    fi
    local exposure
    exposure=$(systemd-analyze security --offline=yes "$unit" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
    if [ -z "$exposure" ] || ! awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
        echo "FAIL: $name exposure ${exposure:-unknown} > $MAX_EXPOSURE"; status=1
    else
        echo "ok: $name exposure $exposure <= $MAX_EXPOSURE"
    fi
    # The unit's Environment= settings (plus an env file for templates),
    # validated by the binary itself against a real state file.
    local state="$work/${name%.service}.state"
    local node nodes
    node=$( { grep -h '^TRADEID_NODE=' "$envfile" 2>/dev/null || true; } | cut -d= -f2)
    nodes=$( { grep -h '^TRADEID_NODES=' "$envfile" 2>/dev/null || true; } | cut -d= -f2)
    local key="$work/${name%.service}.key"
    /usr/local/bin/tradeid keygen --out "$key" >/dev/null
    /usr/local/bin/tradeid init --state "$state" --key-file "$key" ${node:+--node "$node"} ${nodes:+--nodes "$nodes"} >/dev/null
    local -a vars=()
    while IFS= read -r line; do vars+=("$line"); done < <(sed -n 's/^Environment=//p' "$unit"; [ -n "$envfile" ] && grep -v '^#' "$envfile" | grep . || true)
    if env "${vars[@]}" /usr/local/bin/tradeid serve --check-config --state "$state" >/dev/null; then
        echo "ok: --check-config accepts the settings of $name"
    else
        echo "FAIL: --check-config rejects the settings of $name: ${vars[*]}"; status=1
    fi
}

check_unit systemd/tradeid.service ""
# A template is verified as an instance, with the example node settings.
cp systemd/tradeid@.service "$work/tradeid@example.service"
cat > "$work/example.conf" <<'CONF'
TRADEID_LISTEN=0.0.0.0:7071
TRADEID_ADMIN=127.0.0.1:9708
TRADEID_NODE=1
TRADEID_NODES=4
CONF
check_unit "$work/tradeid@example.service" "$work/example.conf"
exit $status

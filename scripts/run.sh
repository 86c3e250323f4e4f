#!/usr/bin/env bash
# Builds tradeid and serves IDs on 127.0.0.1:7070 (admin HTTP on
# 127.0.0.1:9707), with its state file in ./data, created on the first run.
# Extra arguments go to `tradeid serve` (e.g. --workers 2).
#
# The build needs protoc (Debian's protobuf-compiler); as root this
# installs it, otherwise it says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "the build needs protoc: apt-get install -y protobuf-compiler (or run this as root)" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi
mkdir -p data
exec cargo run --release --bin tradeid -- serve --state data/tradeid.state --create \
    --listen "${TRADEID_LISTEN:-127.0.0.1:7070}" --admin "${TRADEID_ADMIN:-127.0.0.1:9707}" "$@"

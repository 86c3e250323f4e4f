#!/usr/bin/env bash
# Runs every test suite, after installing what they need on a fresh Debian
# machine (as root; otherwise it says what to install). This is the
# README's test command; CI runs it too.
#
#   bash scripts/test.sh            everything
#   SKIP_INSTALL=1 bash scripts/test.sh   assume the packages are there
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# Debian packages the suites use: etcd for the cluster tests, openssl for
# their TLS certificates, strace for the msync fault test, systemd for the
# unit checks, protoc for the etcd and gRPC code generation.
PACKAGES=(etcd-server etcd-client openssl strace systemd protobuf-compiler)
COMMANDS=(etcd etcdctl openssl strace systemd-analyze protoc)

step() { printf '\n==> %s\n' "$*"; }

install_packages() {
    local missing=() i
    for i in "${!COMMANDS[@]}"; do
        command -v "${COMMANDS[$i]}" >/dev/null || missing+=("${PACKAGES[$i]}")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing: ${missing[*]}; install them (apt-get install -y ${missing[*]}) or run as root" >&2
        exit 1
    fi
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

[ -n "${SKIP_INSTALL:-}" ] || install_packages

step "Rust tests: unit, integration (real binary, real etcd), loadgen"
cargo test --workspace

step "layering: lean core, unsafe in its two homes"
bash scripts/check-structure.sh

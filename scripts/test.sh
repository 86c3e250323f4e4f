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

# Debian packages the suites use, each with what shows it is installed:
# etcd for the cluster tests, openssl for their TLS certificates, strace for
# the msync fault test, systemd for the unit checks, protoc for the etcd
# and gRPC code, Python's grpcio and pytest for the gRPC tests, and
# Prometheus (and promtool) for the alert rules and the dashboard, and venv
# and mypy for the Python client's suite, and g++ for libFuzzer (built by
# the fuzz crate's compile check).
NEEDS=(
    "etcd:etcd-server" "etcdctl:etcd-client" "openssl:openssl" "strace:strace"
    "systemd-analyze:systemd" "protoc:protobuf-compiler" "grpc_python_plugin:protobuf-compiler-grpc"
    "/usr/lib/python3/dist-packages/grpc:python3-grpcio" "/usr/lib/python3/dist-packages/pytest:python3-pytest"
    "prometheus:prometheus" "promtool:prometheus" "mypy:mypy" "/usr/lib/python3.11/ensurepip:python3-venv" "g++:g++"
)

step() { printf '\n==> %s\n' "$*"; }

install_packages() {
    local missing=() need check package
    for need in "${NEEDS[@]}"; do
        check=${need%%:*} package=${need#*:}
        if [[ $check == /* ]]; then [ -e "$check" ] && continue; else command -v "$check" >/dev/null && continue; fi
        missing+=("$package")
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

step "layering: lean core, unsafe in its two homes, no import cycle"
bash scripts/check-structure.sh

# The fuzz crate is outside the workspace, so nothing else compiles it:
# check that every target still builds against the core (stable toolchain;
# running them needs cargo-fuzz, see docs/fuzzing.md).
step "fuzz targets compile"
cargo check --manifest-path fuzz/Cargo.toml --bins --locked

# The Python suites drive target/debug/tradeid, which `cargo test` just
# built with the test hooks compiled in.
step "gRPC: a stock Python grpcio client against the real server"
/usr/bin/python3 -m pytest -q -p no:cacheprovider tests/grpc

step "Python client: mypy --strict, then pytest against the real server"
PYTHON=/usr/bin/python3 TRADEID_BIN=target/debug/tradeid bash clients/python/run_tests.sh -q

step "alert rules and dashboard: promtool check and test, static checks"
bash contrib/check.sh

step "dashboard and rules against a real Prometheus scraping real servers under load"
cargo build --release --workspace
python3 contrib/live_check.py

#!/usr/bin/env bash
# Checks the layering rules that the compiler does not:
# 1. the core library builds without tokio, hyper or clap (an application
#    embedding the generator must not compile a runtime or a CLI parser);
# 2. `unsafe` code lives only in the mmap store and the socket crate;
# 3. the core never depends on the server or socket crates.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

heavy=$(cargo tree -p tradeid -e normal --prefix none --offline 2>/dev/null | awk '{print $1}' | grep -E '^(tokio|hyper|hyper-util|clap|tonic|etcd-client|tradeid-server|tradeid-udp)$' | sort -u || true)
if [ -n "$heavy" ]; then
    echo "FAIL: the core crate (tradeid) depends on: $heavy"; status=1
else
    echo "ok: the core crate pulls no tokio, hyper, clap, tonic or server crate"
fi

# Code, not prose: an unsafe block, fn, impl or trait.
unsafe_uses=$(grep -rnE --include='*.rs' '(^|[^a-z_])unsafe *(\{|fn |impl |trait )' core src udp loadgen fuzz/fuzz_targets \
    | grep -vE '^(core/src/state/store\.rs|udp/src/lib\.rs):' || true)
if [ -n "$unsafe_uses" ]; then
    echo "FAIL: unsafe outside core/src/state/store.rs and udp/src/lib.rs:"; echo "$unsafe_uses"; status=1
else
    echo "ok: unsafe only in core/src/state/store.rs and udp/src/lib.rs"
fi
exit $status

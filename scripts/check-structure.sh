#!/usr/bin/env bash
# Checks the layering rules that the compiler does not:
# 1. the core library (`tradeid`, without default features) builds without
#    tokio, hyper or clap (an application embedding the generator must not
#    compile a runtime or a CLI parser), and never depends on the server or
#    socket crates;
# 2. `unsafe` code lives only in the mmap store and the socket crate;
# 3. no import cycle among the modules of any crate (scripts/module-cycles.py,
#    which first proves on synthetic crates that it can fail).
# Every check fails closed: a tool that cannot run is a failure, not a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

if ! tree=$(cargo tree -p tradeid --no-default-features -e normal --prefix none --locked); then
    echo "FAIL: cargo tree of the core crate (tradeid) did not run; see its error above"; exit 1
fi
if ! grep -q '^tradeid v' <<<"$tree"; then
    echo "FAIL: cargo tree printed no tradeid package:"; echo "$tree"; exit 1
fi
heavy=$(awk '{print $1}' <<<"$tree" | grep -E '^(tokio|hyper|hyper-util|clap|tonic|etcd-client|tradeid-server|tradeid-udp)$' | sort -u || true)
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

python3 scripts/module-cycles.py --self-test || status=1
python3 scripts/module-cycles.py src/lib.rs core/src/lib.rs udp/src/lib.rs loadgen/src/main.rs || status=1
exit $status

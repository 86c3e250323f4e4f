#!/usr/bin/env bash
# Builds the Debian package: target/debian/tradeid_VERSION_ARCH.deb.
# The units get ExecStart=/usr/bin/tradeid (the manual install in the
# README uses /usr/local/bin); the man pages come from the clap
# definitions. Needs cargo-deb (`cargo install cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tradeid --bin tradeid-manpage
rm -rf target/deb
mkdir -p target/deb/units target/deb/man
for unit in tradeid.service tradeid@.service; do
    sed 's#/usr/local/bin/tradeid#/usr/bin/tradeid#g' "systemd/$unit" > "target/deb/units/$unit"
done
target/release/tradeid-manpage target/deb/man
gzip -9n target/deb/man/*.1
cargo deb --no-build --strip -p tradeid-server "$@"

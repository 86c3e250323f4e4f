#!/usr/bin/env bash
# Installs the Debian package on this machine (CI's, which is thrown away)
# and checks it: the binary runs, the installed unit verifies, the man page
# is there, postinst says how to create the state file, and a purge keeps
# a state file in the unit's state directory byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls -t target/debian/tradeid_*.deb | head -1)
state=/var/lib/private/tradeid/tradeid.state
fail() { echo "FAIL: $*"; exit 1; }

if [ -e "$state" ]; then
    fail "$state already exists on this machine; refusing to test the package here"
fi
out=$(dpkg -i "$deb" 2>&1) || fail "dpkg -i: $out"
echo "$out" | grep -q "tradeid init --state $state" || fail "postinst did not print the init command: $out"
/usr/bin/tradeid --version | grep -q '^tradeid ' || fail "/usr/bin/tradeid --version"
grep -q '^ExecStart=/usr/bin/tradeid serve' /lib/systemd/system/tradeid.service || fail "ExecStart does not point to /usr/bin"
verify=$(systemd-analyze verify /lib/systemd/system/tradeid.service 2>&1) || true
[ -z "$verify" ] || fail "systemd-analyze verify printed: $verify"
[ -e /usr/share/man/man1/tradeid.1.gz ] && [ -e /usr/share/man/man1/tradeid-serve.1.gz ] || fail "man pages missing"
zcat /usr/share/man/man1/tradeid-serve.1.gz | grep -q 'etcd endpoints, comma' || fail "the serve man page lacks --etcd"
[ -e /usr/share/doc/tradeid/contrib/prometheus/alerts.yml ] || fail "contrib files missing"
[ -e /usr/share/doc/tradeid/docs/operations.md ] || fail "docs missing"
[ -d /var/lib/private/tradeid ] && [ ! -e "$state" ] || fail "postinst must create the directory and no state file"
echo "ok: installed, unit verifies, man pages and docs present"

# The operator's one command; then the package goes away.
/usr/bin/tradeid init --state "$state" >/dev/null
before=$(sha256sum "$state")
dpkg --purge tradeid >/dev/null 2>&1 || fail "dpkg --purge"
[ ! -e /usr/bin/tradeid ] || fail "/usr/bin/tradeid survived the purge"
[ -e "$state" ] || fail "the purge deleted $state"
[ "$(sha256sum "$state")" = "$before" ] || fail "the purge changed $state"
echo "ok: purged; $state kept byte for byte"
# Leave the machine as it was.
rm -f "$state"

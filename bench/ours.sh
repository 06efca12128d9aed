#!/usr/bin/env bash
# ours.sh — how anchors.sh starts Ferry (its OURS_PROXY_CMD / OURS_CONNECTOR_CMD), set up by run.sh.
#   ours.sh proxy HTTP_PORT SOCKS_PORT TUNNEL_PORT        `ferry proxy`; SOCKS_PORT is the benchmark-only
#                                                        no-auth SOCKS5 listener (generic SOCKS5 clients)
#   ours.sh connector TUNNEL_PORT ORIGIN SINK             `ferry connector run` mapping origin.virtual:PORT
#                                                        (HTTP) to ORIGIN, ORIGIN and SINK 1:1 (TCP), audit
#                                                        level SECURITY (denied requests are logged)
# Reads FERRY (binary), FERRY_BENCH_STATE (what run.sh prepared), FERRY_BENCH_TUNNELS (tunnel connections;
# unset: the connector's default),
# FERRY_WRAP (a command prefix, e.g. `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p`).
set -euo pipefail
: "${FERRY:?}" "${FERRY_BENCH_STATE:?}"
S=$FERRY_BENCH_STATE
sub=$(cat "$S/subaccount")
case ${1:-} in
  proxy)
    http=$2 socks=$3 tunnel=$4
    cat >"$S/proxy.toml" <<TOML
host = "127.0.0.1"
http_port = $http
socks5_port = 0
tunnel_port = $tunnel
certificate_file = "proxy.pem"
key_file = "proxy-key.pem"
connector_ca_file = "up/data/ca.pem"
token_keys_urls = ["$(cat "$S/token_url")/token_keys?zid=$sub"]
max_connections = 30000
# One load generator on one address holds up to 10,000 streams of one subaccount (pass 2).
max_connections_per_client = 0
max_streams_per_subaccount = 30000

[bench_socks5_no_auth]
listen = "127.0.0.1:$socks"
subaccount = "$sub"
TOML
    FERRY_LOG=${FERRY_LOG:-warn} exec ${FERRY_WRAP:-} "$FERRY" proxy --config "$S/proxy.toml"
    ;;
  connector)
    tunnel=$2 origin=$3 sink=$4
    c=$S/connector
    cat >"$c/bench.toml" <<TOML
proxies = ["127.0.0.1:$tunnel"]
server_name = "localhost"
ca_file = "ca.pem"
certificate_file = "connector.pem"
key_file = "connector-key.pem"
${FERRY_BENCH_TUNNELS:+connections = $FERRY_BENCH_TUNNELS}
audit_level = "SECURITY"
audit_dir = "audit"

# HTTP proxy scenarios address the origin as origin.virtual (run.sh sets OURS_ORIGIN_URL); SOCKS5
# clients (hey) by its own address, which is a TCP mapping.
[[mappings]]
virtualHost = "origin.virtual"
virtualPort = ${origin##*:}
localHost = "${origin%:*}"
localPort = ${origin##*:}
protocol = "HTTP"
resources = [{ path = "/", exactMatchOnly = false }]

[[mappings]]
virtualHost = "${origin%:*}"
virtualPort = ${origin##*:}
localHost = "${origin%:*}"
localPort = ${origin##*:}
protocol = "TCP"

[[mappings]]
virtualHost = "${sink%:*}"
virtualPort = ${sink##*:}
localHost = "${sink%:*}"
localPort = ${sink##*:}
protocol = "TCP"
TOML
    FERRY_LOG=${FERRY_LOG:-warn} exec ${FERRY_WRAP:-} "$FERRY" connector run --config "$c/bench.toml"
    ;;
  *) echo "usage: $0 proxy HTTP SOCKS TUNNEL | connector TUNNEL ORIGIN SINK" >&2; exit 2 ;;
esac

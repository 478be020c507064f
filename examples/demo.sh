#!/usr/bin/env bash
# The natsfn demo: builds the example guests, starts natsfn on
# examples/quickstart with its own local nats-server, sends each handler a
# message, then keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/setup.sh

echo "== building the example guests"
(cd guests && cargo build --release --quiet)
echo "== building natsfn"
cargo build --release --quiet -p natsfn
natsfn=target/release/natsfn

log=$(mktemp)
"$natsfn" run --handlers examples/quickstart > >(tee "$log") 2>&1 &
host=$!
trap 'kill -INT $host 2>/dev/null; wait $host 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 1 200); do grep -q "natsfn: ready" "$log" && break; sleep 0.1; done
url=$(grep -o 'nats://127.0.0.1:[0-9]*' "$log" | head -n 1)
[ -n "$url" ] || { echo "natsfn did not start"; exit 1; }

echo
echo "== trying the handlers on $url"
echo "\$ natsfn request demo.echo 'hello'";    "$natsfn" request --nats "$url" demo.echo 'hello'
echo "\$ natsfn request demo.greet 'world'";   "$natsfn" request --nats "$url" demo.greet 'world'
echo "\$ natsfn request demo.greet.fr 'Ada'";  "$natsfn" request --nats "$url" demo.greet.fr 'Ada'
echo "\$ natsfn request demo.relay 'relayed'"; "$natsfn" request --nats "$url" demo.relay 'relayed'
echo "\$ natsfn request demo.fanout 'copies'"; "$natsfn" request --nats "$url" demo.fanout 'copies'
echo
echo "natsfn keeps serving at $url; try: $natsfn request --nats $url demo.greet you"
echo "Press Ctrl-C to stop (in-flight messages finish first)."
wait $host

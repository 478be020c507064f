#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints (host and
# guests, warnings are errors), API docs (broken links are errors), guest
# build, then every test against real nats-server processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/setup.sh

# A clean clone gains nothing from incremental state, and it is gigabytes
# across the test binaries. Set CARGO_INCREMENTAL=1 to keep it locally.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== fmt"
cargo fmt --all -- --check
(cd guests && cargo fmt --all -- --check)

echo "== guests"
(cd guests && cargo clippy --release --all-targets -- -D warnings && cargo build --release)

echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== docs"
RUSTDOCFLAGS="-D warnings" cargo doc -p natsfn --no-deps

echo "== tests"
cargo build --workspace --all-targets
cargo test --workspace

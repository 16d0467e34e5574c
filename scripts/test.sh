#!/usr/bin/env bash
# The whole test suite: the README's second command, and what CI runs after its checks.
# cargo-nextest runs each test in its own process and the suite's binaries in parallel; a fresh
# machine with only Rust gets it installed here first.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
exec cargo nextest run --workspace --locked "$@"

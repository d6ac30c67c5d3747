#!/usr/bin/env bash
# The whole test suite: prepares the local PostgreSQL and MariaDB for change
# capture (idempotent), then runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash docker/setup-local-databases.sh
cargo test --locked "$@"

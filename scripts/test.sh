#!/usr/bin/env bash
# The whole test suite: prepares the local PostgreSQL and MariaDB for change
# capture (idempotent), runs every test against them, then scans the logs
# of the whole run for personal data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash docker/setup-local-databases.sh
rm -rf target/tmp/test-logs target/tmp/ledger_crash.log
cargo test --locked "$@"
bash scripts/scan-logs.sh target/tmp/test-logs target/tmp/ledger_crash.log

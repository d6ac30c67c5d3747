#!/usr/bin/env bash
# The end-to-end demo on the local databases: makes both servers ready for
# change capture, builds, and runs `loyalty-cdc demo` (fresh Odoo POS and
# Magento 2 databases, a local provider receiver, generated customers, a
# live view). Arguments go to `loyalty-cdc demo`, e.g. --duration 2m.
set -euo pipefail
cd "$(dirname "$0")/.."
bash docker/setup-local-databases.sh
cargo build --locked --quiet
exec target/debug/loyalty-cdc demo "$@"

#!/usr/bin/env bash
# The end-to-end demo on the local databases.
#
# Today (foundation stage) it prepares both servers for change capture,
# creates a point-of-sale database with the real Odoo POS schema and a web
# shop database with the real Magento 2 schema, writes a configuration for
# them, then runs `loyalty-cdc check` (every prerequisite, with fixes) and
# `loyalty-cdc migrate` (the ledger schema). Streaming, the ledger and
# delivery join as their issues land; this script then becomes
# `loyalty-cdc demo`.
#
# Re-running it starts from fresh demo databases.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
shared=${LOYALTY_SHARED_DIR:-$root/../shared}
[[ -d $shared/schemas ]] || { echo "demo: $shared/schemas not found; set LOYALTY_SHARED_DIR" >&2; exit 1; }

bash docker/setup-local-databases.sh
cargo build --locked --quiet
bin=$root/target/debug/loyalty-cdc

step() { printf '\n== %s\n' "$*"; }

step "fresh demo databases: loyalty_demo_ledger and loyalty_demo_pos (PostgreSQL), loyalty_demo_shop (MariaDB)"
export PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres PGOPTIONS="-c client_min_messages=warning"
psql -X -q -At -d postgres -v ON_ERROR_STOP=1 -o /dev/null <<'SQL'
SELECT count(pg_drop_replication_slot(slot_name)) AS slots_dropped FROM pg_replication_slots
 WHERE database IN ('loyalty_demo_pos', 'loyalty_demo_ledger');
DROP DATABASE IF EXISTS loyalty_demo_pos WITH (FORCE);
DROP DATABASE IF EXISTS loyalty_demo_ledger WITH (FORCE);
CREATE DATABASE loyalty_demo_pos;
CREATE DATABASE loyalty_demo_ledger;
SQL
psql -X -q -d loyalty_demo_pos -v ON_ERROR_STOP=1 -f "$shared/schemas/odoo-pos.postgres.sql"
mariadb -uroot -h127.0.0.1 --protocol=tcp -e "DROP DATABASE IF EXISTS loyalty_demo_shop; CREATE DATABASE loyalty_demo_shop"
mariadb -uroot -h127.0.0.1 --protocol=tcp loyalty_demo_shop <"$shared/schemas/magento2.mysql.sql"
echo "loaded odoo-pos.postgres.sql ($(psql -X -qAt -d loyalty_demo_pos -c "SELECT count(*) FROM information_schema.tables WHERE table_schema='public'") tables) and magento2.mysql.sql ($(mariadb -uroot -h127.0.0.1 --protocol=tcp -N -e "SELECT count(*) FROM information_schema.tables WHERE table_schema='loyalty_demo_shop'") tables)"

mkdir -p target/demo
config=target/demo/loyalty-cdc.toml
cat >"$config" <<'TOML'
[ledger]
url = "postgres://postgres@127.0.0.1:5432/loyalty_demo_ledger"

[[sources]]
name = "pos"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/loyalty_demo_pos"

[[sources]]
name = "shop"
kind = "mysql"
url = "mysql://root@127.0.0.1:3306/loyalty_demo_shop"

[program]
points_per_currency_unit = 1
tiers = [
  { name = "member", threshold = 0 },
  { name = "silver", threshold = 500 },
  { name = "gold", threshold = 2000 },
]
TOML
echo "wrote $config"

step "loyalty-cdc check"
"$bin" --config "$config" check

step "loyalty-cdc migrate"
"$bin" --config "$config" migrate
"$bin" --config "$config" migrate

step "the ledger is ready"
psql -X -d loyalty_demo_ledger -c "SELECT version, name, applied_on FROM refinery_schema_history ORDER BY version" \
     -c "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"

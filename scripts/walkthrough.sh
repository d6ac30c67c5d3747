#!/usr/bin/env bash
# A scripted walkthrough on the local databases: one customer, step by step.
#
# It prepares both servers for change capture, creates a point-of-sale
# database with the real Odoo POS schema and a web shop database with the
# real Magento 2 schema, writes a configuration for them with the shipped
# mappings, runs `loyalty-cdc check` and `loyalty-cdc migrate`, then
# `loyalty-cdc run`: a customer buys at the till and online, gets a partial
# refund, and `loyalty-cdc member show` prints her one balance across both.
# `bash scripts/demo.sh` (`loyalty-cdc demo`) is the demo with generated
# traffic; this script follows one customer through the commands.
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
mariadb -uroot -h127.0.0.1 --protocol=tcp loyalty_demo_shop <connectors/schemas/magento2-catalog.mysql.sql
echo "loaded odoo-pos.postgres.sql ($(psql -X -qAt -d loyalty_demo_pos -c "SELECT count(*) FROM information_schema.tables WHERE table_schema='public'") tables) and magento2.mysql.sql + magento2-catalog.mysql.sql ($(mariadb -uroot -h127.0.0.1 --protocol=tcp -N -e "SELECT count(*) FROM information_schema.tables WHERE table_schema='loyalty_demo_shop'") tables)"

mkdir -p target/demo
step "a local provider receiver (Standard Webhooks, signatures checked: target/demo/webhooks.log)"
secret="whsec_$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
rm -f target/demo/receiver.port target/demo/webhooks.log
python3 scripts/webhook_receiver.py target/demo/receiver.port target/demo/webhooks.log "$secret" &
receiver_pid=$!
for _ in $(seq 1 50); do [[ -s target/demo/receiver.port ]] && break; sleep 0.1; done
receiver_port=$(cat target/demo/receiver.port)
echo "listening on 127.0.0.1:$receiver_port"

config=target/demo/loyalty-cdc.toml
cat >"$config" <<TOML
[ledger]
url = "postgres://postgres@127.0.0.1:5432/loyalty_demo_ledger"

[[sources]]
name = "pos"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/loyalty_demo_pos"
mapping = "$root/connectors/sources/odoo-pos.toml"

[[sources]]
name = "shop"
kind = "mysql"
url = "mysql://root@127.0.0.1:3306/loyalty_demo_shop"
mapping = "$root/connectors/sources/magento2.toml"

[program]
points_per_currency_unit = 1
tiers = [
  { name = "member", threshold = 0 },
  { name = "silver", threshold = 500 },
  { name = "gold", threshold = 2000 },
]

[[providers]]
name = "crm"
template = "$root/connectors/providers/webhook.toml"
base_url = "http://127.0.0.1:$receiver_port/loyalty-events"
secrets.signing_secret = { env = "DEMO_WEBHOOK_SECRET" }

[triggers]
scheduler_interval_seconds = 5

[triggers.milestones]
purchases = [1, 2]

[[triggers.routes]]
trigger = "welcome"
provider = "crm"

[[triggers.routes]]
trigger = "milestone"
provider = "crm"

[[triggers.routes]]
trigger = "points_earned"
provider = "crm"

[[offers]]
code = "WELCOME-50"
title = "50 bonus points on your next purchase"
triggers = ["welcome"]
bonus_points = 50
valid_days = 30
TOML
echo "wrote $config"

step "loyalty-cdc check"
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" check

step "loyalty-cdc migrate"
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" migrate
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" migrate

step "the ledger is ready"
psql -X -d loyalty_demo_ledger -c "SELECT version, name, applied_on FROM refinery_schema_history ORDER BY version" \
     -c "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"

step "loyalty-cdc run: both sources streaming into the ledger (log: target/demo/run.log)"
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" run >target/demo/run.log 2>&1 &
run_pid=$!
trap 'kill "$run_pid" "$receiver_pid" 2>/dev/null || true' EXIT
ledger_sql() { psql -X -qAt -d loyalty_demo_ledger -c "$1" 2>/dev/null || echo 0; }
for _ in $(seq 1 150); do
  [[ $(ledger_sql "SELECT count(*) FROM source_positions WHERE state = 'streaming'") == 2 ]] && break
  sleep 0.2
done
echo "sources streaming: $(ledger_sql "SELECT string_agg(source || ' at ' || position, ', ') FROM source_positions")"

step "a customer buys at the till (Odoo: 119.00 incl. 19.00 tax) and is refunded half"
psql -X -q -d loyalty_demo_pos -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO res_currency (id, name, symbol) VALUES (1, 'EUR', '€');
INSERT INTO res_partner (id, name, type, is_company) VALUES (1, 'Demo Store GmbH', 'contact', true);
INSERT INTO res_company (id, name, partner_id, currency_id) VALUES (1, 'Demo Store GmbH', 1, 1);
INSERT INTO product_template (id, name) VALUES (1, '{"en_US": "Coffee beans 1 kg"}');
INSERT INTO product_product (id, default_code, product_tmpl_id) VALUES (1, 'COF-1KG', 1);
INSERT INTO pos_config (id, name, currency_id, company_id) VALUES (1, 'Berlin Mitte', 1, 1);
BEGIN;
INSERT INTO res_partner (id, name, type, email, phone, barcode)
  VALUES (5, 'Anna Schmidt', 'contact', 'anna.schmidt@example.de', '+49 30 1234567', '{"1": "CARD-4711"}');
INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id, partner_id, config_id, is_refund, state)
  VALUES (1, 'Berlin/0001', 19, 119, 119, 0, 1, 5, 1, false, 'paid');
INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
  VALUES (11, 'L1', 1, 2, 50, 59.5, 1), (12, 'L2', 1, 2, 50, 59.5, 1);
COMMIT;
UPDATE pos_order SET state = 'done' WHERE id = 1;
BEGIN;
INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id, partner_id, config_id, is_refund, state)
  VALUES (2, 'Berlin/0001 REFUND', -9.5, -59.5, -59.5, 0, 1, 5, 1, true, 'paid');
INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id, refunded_orderline_id)
  VALUES (21, 'L1', 1, -2, -50, -59.5, 2, 11);
COMMIT;
SQL

# A moment later (the binlog's commit times have whole seconds, and a
# welcome offer is redeemed by a purchase after the welcome).
sleep 1.2
step "the same customer orders online (Magento: 100.00 goods, 10.00 discount), it ships"
mariadb -uroot -h127.0.0.1 --protocol=tcp loyalty_demo_shop <<'SQL'
INSERT INTO store_website (website_id, code, name) VALUES (1, 'base', 'Main Website');
INSERT INTO store (store_id, code, website_id, name) VALUES (1, 'default', 1, 'Default Store View');
INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (7, 1, 1, 'Anna.Schmidt@Example.DE');
START TRANSACTION;
INSERT INTO sales_order (entity_id, state, status, store_id, customer_id, customer_is_guest, customer_email,
  base_subtotal, base_discount_amount, base_tax_amount, base_shipping_amount, base_grand_total, base_currency_code, increment_id)
  VALUES (1, 'new', 'pending', 1, 7, 0, 'Anna.Schmidt@Example.DE', 100, -10, 17.1, 5, 112.1, 'EUR', '000000001');
INSERT INTO sales_order_item (item_id, order_id, product_type, sku, qty_ordered, base_row_total, row_total)
  VALUES (1, 1, 'simple', 'MUG-BLUE', 2, 100, 100);
COMMIT;
UPDATE sales_order SET state = 'processing', status = 'processing' WHERE entity_id = 1;
UPDATE sales_order SET state = 'complete', status = 'complete' WHERE entity_id = 1;
SQL

for _ in $(seq 1 150); do
  [[ $(ledger_sql "SELECT count(*) FROM orders WHERE stage = 'completed'") == 2 && $(ledger_sql "SELECT count(*) FROM order_refunds") == 1 ]] && break
  sleep 0.2
done

step "loyalty-cdc member show anna.schmidt@example.de (one member: till and shop, 100 - 50 + 90 points, + 50 from the welcome offer)"
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" member show anna.schmidt@example.de
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" member show card:CARD-4711 --json

step "triggers delivered to the local receiver (welcome with its offer, milestones, points earned)"
for _ in $(seq 1 100); do
  [[ $(ledger_sql "SELECT count(*) FROM outbox WHERE status = 'pending'") == 0 && -s target/demo/webhooks.log ]] && break
  sleep 0.2
done
cat target/demo/webhooks.log
psql -X -d loyalty_demo_ledger -c "SELECT trigger, status, attempts, payload->'offer'->>'code' AS offer FROM outbox ORDER BY created_at, trigger"
DEMO_WEBHOOK_SECRET="$secret" "$bin" --config "$config" dlq list

step "stopping loyalty-cdc run (SIGTERM: the open batch is committed first)"
kill -TERM "$run_pid"
wait "$run_pid" || true
kill "$receiver_pid" 2>/dev/null || true
trap - EXIT
# An abandoned slot pins WAL forever: the demo drops its own (a re-run
# starts from fresh databases anyway).
psql -X -qAt -d postgres -c "SELECT 'dropped replication slot ' || slot_name || ': ' || pg_drop_replication_slot(slot_name)::text FROM pg_replication_slots WHERE database = 'loyalty_demo_pos'" | sed 's/: $//'
echo "done; the ledger is in database loyalty_demo_ledger, the run log in target/demo/run.log"

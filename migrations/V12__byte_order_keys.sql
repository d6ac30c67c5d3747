-- Every text column of the ledger's tables compares by bytes (COLLATE "C").
--
-- The ledger's text is keys — sources, order and refund references,
-- identifier kinds and values, effect keys, reference-row keys, products,
-- segments, marks — matched for equality. Where it is sorted, byte order
-- serves as well: tie-breaks, and identifiers in `member show`, which are
-- normalized (lower-case emails, E.164 phones) before they are stored.
-- Under a linguistic collation (en_US.UTF-8, or C.UTF-8 in PostgreSQL 15,
-- which is not the "C" fast path) each B-tree comparison goes through
-- strcoll: about a tenth of the ledger backend's CPU in a drain went to it
-- (perf, 2026-12-02). Byte order makes each one a memcmp.
--
-- All of the ledger's tables at once, so that no comparison between two of
-- their columns meets two collations; named one by one, so that a table
-- of something else sharing the schema is left as it is. The type stays
-- text: PostgreSQL rewrites no table for this, it rebuilds the indexes on
-- these columns. Tables added later declare their text COLLATE "C"
-- themselves (`tests/it/migrate.rs` checks every ledger text column).
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.table_name,
               string_agg(format('ALTER COLUMN %I TYPE text COLLATE "C"', c.column_name), ', '
                          ORDER BY c.ordinal_position) AS changes
          FROM information_schema.columns c
         WHERE c.table_schema = current_schema()
           AND c.data_type = 'text'
           AND c.table_name IN (
                   'balances', 'co_purchases', 'dead_letters', 'delivery_attempts', 'ledger_entries',
                   'member_features', 'member_identifiers', 'member_merges', 'member_offers',
                   'member_products', 'member_profiles', 'member_segments', 'members',
                   'order_refunds', 'orders', 'outbox', 'product_buyers', 'product_prices',
                   'provider_endpoints', 'quarantine', 'reference_rows', 'scheduled_triggers',
                   'shared_identifiers', 'source_positions', 'trigger_marks', 'wishlist_items')
         GROUP BY c.table_name
    LOOP
        EXECUTE format('ALTER TABLE %I %s', t.table_name, t.changes);
    END LOOP;
END
$$;

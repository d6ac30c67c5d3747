-- Every text column of the ledger compares by bytes (COLLATE "C").
--
-- The ledger's text is keys — sources, order and refund references,
-- identifier kinds and values, effect keys, reference-row keys, products,
-- segments, marks — that are matched for equality and never sorted for a
-- reader. Under a linguistic collation (en_US.UTF-8, or C.UTF-8 in
-- PostgreSQL 15, which is not the "C" fast path) each B-tree comparison
-- goes through strcoll: about a tenth of the ledger backend's CPU in a
-- drain went to it (perf, 2026-12-02). Byte order makes each one a memcmp.
--
-- All of them at once, so that no comparison between two columns meets two
-- collations. The type stays text: PostgreSQL rewrites no table for this,
-- it rebuilds the indexes on these columns.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.table_name,
               string_agg(format('ALTER COLUMN %I TYPE text COLLATE "C"', c.column_name), ', '
                          ORDER BY c.ordinal_position) AS changes
          FROM information_schema.columns c
          JOIN information_schema.tables tb
            ON tb.table_schema = c.table_schema AND tb.table_name = c.table_name
         WHERE c.table_schema = current_schema()
           AND tb.table_type = 'BASE TABLE'
           AND c.data_type = 'text'
           AND c.table_name <> 'refinery_schema_history'
         GROUP BY c.table_name
    LOOP
        EXECUTE format('ALTER TABLE %I %s', t.table_name, t.changes);
    END LOOP;
END
$$;

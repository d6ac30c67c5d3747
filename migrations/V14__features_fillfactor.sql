-- Room on each page of the counters a purchase updates, so the update can
-- be a heap-only tuple (HOT): the new row version stays on its page and
-- no index entry is written. Every purchase updates its member's
-- `member_features` row and one `member_products` row per product; on
-- full pages (the default fillfactor, 100) each update moved the row to
-- another page and added an index entry. Their only indexes are their
-- primary keys, which no update changes, so every update can be HOT.
-- On 5,000 rows updated in one statement: 50 ms on full pages, 24 ms
-- with room (2026-12-03). Pages written from now on keep the room; a
-- table's existing pages get it at its next rewrite (VACUUM FULL).
ALTER TABLE member_features SET (fillfactor = 70);
ALTER TABLE member_products SET (fillfactor = 70);

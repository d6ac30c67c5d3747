-- The features a member entered a segment with are kept as `json`, the
-- text as written, not `jsonb`.
--
-- They are written once per entry, in the ledger transaction, and only
-- ever read back whole, to explain the entry: nothing looks inside them in
-- SQL. Parsing each into jsonb (a numeric per score and share) cost three
-- times the json check: 10,000 entries of a real snapshot, 118 ms against
-- 40-58 ms, and 22 ms with no features at all (2026-12-02).
ALTER TABLE member_segments ALTER COLUMN features TYPE json;

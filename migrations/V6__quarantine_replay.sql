-- `quarantine replay`: each quarantined row keeps a typed copy of what it
-- came from, so it can be booked again once the mapping (or the ledger) is
-- fixed, exactly as it would have been booked from the stream.
--
-- `replay` is a postcard-encoded `normalize::Replay`: the document's source
-- changes with their column types and table layout (an order header with
-- its lines from the same source transaction), or the mapped event the
-- ledger could not book (a refund of an order it has not seen, a redemption
-- beyond the balance). NULL for rows quarantined before this version, and
-- for rows whose values were erased (GDPR): replaying those would bring the
-- erased data back. `occurred_at` and `live` are the original business time
-- and whether the change came from the stream (only live changes fire
-- triggers), so a replay books what the stream would have booked.
-- `replay_outcome` says what the replay did.
ALTER TABLE quarantine
    ADD COLUMN replay         bytea,
    ADD COLUMN occurred_at    timestamptz,
    ADD COLUMN live           boolean,
    ADD COLUMN replay_outcome text;

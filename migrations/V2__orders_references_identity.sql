-- Orders and refunds as the ledger knows them, reference data kept from the
-- change stream, merge history and shared identifiers. Owned by `ledger`.

-- Completing a placed order moves its points from pending to available:
-- one entry takes them out of pending, another books them available, so
-- every entry changes exactly one bucket and balances can be recomputed
-- from entries alone.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN (
    'earn_pending', 'pending_release', 'earn_available', 'pending_void', 'clawback',
    'redeem', 'expire', 'adjust'));

-- The last known state of every order of every source. Transitions (paid ->
-- done is one sale) are judged against `stage`, whether or not the source
-- sends before-images. `member_id` is NULL for anonymous orders: counted,
-- earning nothing. `points` is what the order earned; `clawed_back` how
-- much of it refunds and cancellations took back (never more than points).
CREATE TABLE orders (
    source       text    NOT NULL,
    order_ref    text    NOT NULL,
    member_id    bigint  REFERENCES members (member_id),
    stage        text    NOT NULL CHECK (stage IN ('placed', 'completed', 'cancelled', 'refunded')),
    earn_basis   numeric NOT NULL,
    grand_total  numeric NOT NULL,
    currency     text,
    channel      text,
    points       bigint  NOT NULL DEFAULT 0 CHECK (points >= 0),
    refunded     numeric NOT NULL DEFAULT 0,
    clawed_back  bigint  NOT NULL DEFAULT 0 CHECK (clawed_back >= 0 AND clawed_back <= points),
    lines        integer NOT NULL DEFAULT 0,
    placed_at    timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (source, order_ref)
);
CREATE INDEX orders_member ON orders (member_id, placed_at) WHERE member_id IS NOT NULL;

-- Refunds booked, so a refund is booked once whatever replays happen.
CREATE TABLE order_refunds (
    source       text    NOT NULL,
    refund_ref   text    NOT NULL,
    order_ref    text    NOT NULL,
    amount       numeric NOT NULL,
    points       bigint  NOT NULL,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (source, refund_ref)
);

-- Reference data (`[[references]]` of a mapping) kept current from the same
-- change stream, so a lookup never queries the source. May hold PII
-- (customer rows): stays in the database, never logged.
CREATE TABLE reference_rows (
    source     text  NOT NULL,
    reference  text  NOT NULL,
    key        text  NOT NULL,
    row_data   jsonb NOT NULL,
    PRIMARY KEY (source, reference, key)
);

-- Every merge: which member went into which, and the identifier that showed
-- they are one person. The older member survives.
CREATE TABLE member_merges (
    merge_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    merged_member bigint NOT NULL REFERENCES members (member_id),
    into_member   bigint NOT NULL REFERENCES members (member_id),
    via_kind      text   NOT NULL,
    via_value     text   NOT NULL,
    merged_at     timestamptz NOT NULL
);

-- Values seen linking more members than the per-kind limit allows (a
-- cashier's default card): they link no one any more.
CREATE TABLE shared_identifiers (
    kind        text NOT NULL,
    value       text NOT NULL,
    detected_at timestamptz NOT NULL,
    PRIMARY KEY (kind, value)
);

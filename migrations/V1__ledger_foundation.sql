-- Ledger foundation: members and their identifiers, the points ledger and
-- balances, where each source stands, quarantined input and the outbox.
-- Owned by `ledger` (members, identifiers, entries, balances, positions,
-- quarantine) and `delivery` (outbox). Later issues extend these tables with
-- new versioned files; never edit a migration that has shipped.

-- One unified loyalty member. A merge keeps the older member and points the
-- newer one at it (`merged_into`), so history stays readable.
CREATE TABLE members (
    member_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at   timestamptz NOT NULL,
    tier         text,
    merged_into  bigint REFERENCES members (member_id),
    merged_at    timestamptz,
    erased_at    timestamptz,
    CHECK (merged_into IS NULL OR merged_into <> member_id),
    CHECK ((merged_into IS NULL) = (merged_at IS NULL))
);

-- Normalized identifiers (email lower-cased, phone in E.164, card digits,
-- a source's own customer id as `<source>:<id>`). One identifier belongs to
-- one member at a time.
CREATE TABLE member_identifiers (
    kind          text   NOT NULL CHECK (kind IN ('email', 'phone', 'card', 'customer')),
    value         text   NOT NULL CHECK (value <> ''),
    member_id     bigint NOT NULL REFERENCES members (member_id),
    first_source  text   NOT NULL,
    first_seen_at timestamptz NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX member_identifiers_member ON member_identifiers (member_id);

-- Every change of a member's points, append-only. `effect_key` names the
-- source fact that caused it (e.g. `pos:order:42:earn`), so the same fact can
-- never be booked twice, whatever replays or re-snapshots happen.
-- `occurred_at` is the source commit time (business time), `recorded_at` the
-- wall clock.
CREATE TABLE ledger_entries (
    entry_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    member_id    bigint NOT NULL REFERENCES members (member_id),
    kind         text   NOT NULL CHECK (kind IN (
                     'earn_pending', 'earn_available', 'pending_void', 'clawback',
                     'redeem', 'expire', 'adjust')),
    points       bigint NOT NULL,
    source       text   NOT NULL,
    order_ref    text,
    effect_key   text   NOT NULL UNIQUE,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_member ON ledger_entries (member_id, occurred_at);
CREATE INDEX ledger_entries_order ON ledger_entries (source, order_ref) WHERE order_ref IS NOT NULL;

-- Current balances, maintained in the same transaction as the entries.
-- `available` may go negative after a clawback: shown, not hidden.
CREATE TABLE balances (
    member_id   bigint PRIMARY KEY REFERENCES members (member_id),
    available   bigint NOT NULL DEFAULT 0,
    pending     bigint NOT NULL DEFAULT 0 CHECK (pending >= 0),
    lifetime    bigint NOT NULL DEFAULT 0 CHECK (lifetime >= 0),
    updated_at  timestamptz NOT NULL
);

-- Where each source stands. Written in the same transaction as the effects
-- of every change up to `position`: on restart, the reader resumes here and
-- skips anything at or before it. `position` is the source's own notation
-- (PostgreSQL commit LSN `0/16B3748`; MariaDB GTID list or MySQL GTID set,
-- with `file:pos`).
CREATE TABLE source_positions (
    source        text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('postgres', 'mysql')),
    state         text NOT NULL CHECK (state IN ('snapshotting', 'streaming', 'parked')),
    position      text NOT NULL,
    commit_ts     timestamptz,
    updated_at    timestamptz NOT NULL
);

-- Source changes that could not be mapped (NULL key, unparsable amount,
-- unknown status): kept with the reason and the position, listed and
-- replayed by operators. `row_data` may hold PII: it stays in the database
-- and is never logged.
CREATE TABLE quarantine (
    quarantine_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source         text NOT NULL,
    position       text NOT NULL,
    table_name     text NOT NULL,
    operation      text NOT NULL CHECK (operation IN ('insert', 'update', 'delete', 'truncate')),
    reason         text NOT NULL,
    row_data       jsonb,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    replayed_at    timestamptz
);
CREATE INDEX quarantine_open ON quarantine (source, quarantine_id) WHERE replayed_at IS NULL;

-- Triggers to deliver, written in the transaction that caused them.
-- `message_id` is the stable id every attempt carries (Standard Webhooks
-- `webhook-id`, provider idempotency fields); `dedupe_key` makes a trigger
-- fire once per occasion.
CREATE TABLE outbox (
    message_id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dedupe_key      text NOT NULL UNIQUE,
    member_id       bigint REFERENCES members (member_id),
    trigger         text NOT NULL,
    provider        text NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'dead', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';

-- Triggers and delivery. `ledger` owns the new profile columns; `triggers`
-- owns trigger_marks; `delivery` owns the outbox's delivery state,
-- delivery_attempts, dead_letters and provider_endpoints.

-- Where push and LINE messages go (a device registration token, a LINE
-- user id), as the sources state them. No push without a token.
ALTER TABLE member_profiles
    ADD COLUMN push_token   text,
    ADD COLUMN line_user_id text;

-- What each member has reached and been told about: `welcome`,
-- `tier:gold`, `milestone:purchases:10`. A mark is written once; a
-- trigger fires only when the mark is new and was reached by a live
-- change (`announced`), so the history a snapshot copies in reaches its
-- marks silently and a restart or replay never fires twice.
CREATE TABLE trigger_marks (
    member_id   bigint      NOT NULL REFERENCES members (member_id),
    mark        text        NOT NULL,
    reached_at  timestamptz NOT NULL,
    announced   boolean     NOT NULL,
    PRIMARY KEY (member_id, mark)
);

-- The outbox grows what delivery needs: the route (which configured
-- trigger route made the row), the channel (whose consent it needs), the
-- trigger's business time, and why a row is held, suppressed or dead.
-- A held row stays `pending` with `next_attempt_at` at the end of the
-- hold. Delivery claims rows with FOR UPDATE SKIP LOCKED in the
-- transaction that records their outcome, so a worker that dies mid-send
-- leaves them pending and due.
ALTER TABLE outbox
    ADD COLUMN route         text NOT NULL DEFAULT '',
    ADD COLUMN channel       text NOT NULL DEFAULT 'webhook'
               CHECK (channel IN ('email', 'sms', 'push', 'messaging', 'webhook')),
    ADD COLUMN occurred_at   timestamptz,
    ADD COLUMN status_reason text,
    DROP CONSTRAINT outbox_status_check,
    ADD CONSTRAINT outbox_status_check
        CHECK (status IN ('pending', 'sent', 'dead', 'cancelled', 'suppressed'));
-- Caps and cooldowns look at what a member was sent lately; erasure at
-- all of a member's messages. (Every index of the outbox is written on
-- every status change: one index serves both.)
CREATE INDEX outbox_member ON outbox (member_id, sent_at);

-- Every attempt and every policy decision on a message: what happened,
-- the HTTP status, how long it took, and a short detail (the reason, or the
-- start of the response with e-mail addresses and phone numbers masked).
CREATE TABLE delivery_attempts (
    attempt_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   uuid        NOT NULL REFERENCES outbox (message_id),
    attempt      integer     NOT NULL,
    outcome      text        NOT NULL
                 CHECK (outcome IN ('sent', 'retry', 'dead', 'held', 'suppressed', 'disabled')),
    status_code  integer,
    latency_ms   integer,
    detail       text,
    at           timestamptz NOT NULL
);
CREATE INDEX delivery_attempts_message ON delivery_attempts (message_id, attempt_id);

-- Messages a provider refused for good (a 4xx other than 408/429), or that
-- ran out of attempts: with the provider's response body as it came
-- (truncated to 8 KiB; it may name the recipient, so it stays in the
-- database and is never logged). `dlq replay` makes the message due again.
CREATE TABLE dead_letters (
    dead_letter_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     uuid        NOT NULL REFERENCES outbox (message_id),
    provider       text        NOT NULL,
    reason         text        NOT NULL,
    status_code    integer,
    response_body  text,
    dead_at        timestamptz NOT NULL,
    replayed_at    timestamptz
);
CREATE INDEX dead_letters_open ON dead_letters (dead_letter_id) WHERE replayed_at IS NULL;

-- A provider endpoint that answered 410 Gone is disabled until an operator
-- re-enables it (`dlq replay` of one of its messages does).
CREATE TABLE provider_endpoints (
    provider        text PRIMARY KEY,
    disabled_at     timestamptz,
    disabled_reason text
);

-- Scheduled triggers: one row per member and kind, with the time it comes
-- due, kept current by the ledger transaction whenever the member changes
-- (a purchase moves the lapse date). The scheduler reads only rows that
-- are due (an index, not a scan of members), fires each once (its
-- `occasion` keys the outbox row) and deletes it in the same transaction.
-- `points_expiry` is not a message: it books the expiry of the balance.
CREATE TABLE scheduled_triggers (
    member_id bigint      NOT NULL REFERENCES members (member_id),
    kind      text        NOT NULL CHECK (kind IN ('lapse_risk', 'points_expiring', 'points_expiry')),
    due_at    timestamptz NOT NULL,
    occasion  text        NOT NULL,
    data      jsonb       NOT NULL,
    PRIMARY KEY (member_id, kind)
);
CREATE INDEX scheduled_triggers_due ON scheduled_triggers (due_at);

-- Offers granted to members by triggers (`[[offers]]` in the configuration:
-- the trigger's message carries the offer), and redeemed by the member's
-- next purchase within the validity: the earn rule then multiplies the
-- points or adds the bonus. Business time throughout (the trigger's and the
-- order's source time), so replays decide the same. Owned by `ledger`.
CREATE TABLE member_offers (
    member_id    bigint      NOT NULL REFERENCES members (member_id),
    occasion     text        NOT NULL,
    code         text        NOT NULL,
    multiplier   numeric     NOT NULL DEFAULT 1 CHECK (multiplier >= 1),
    bonus_points bigint      NOT NULL DEFAULT 0 CHECK (bonus_points >= 0),
    granted_at   timestamptz NOT NULL,
    valid_until  timestamptz NOT NULL,
    redeemed_at  timestamptz,
    redeemed_by  text,
    PRIMARY KEY (member_id, occasion)
);
CREATE INDEX member_offers_open ON member_offers (member_id, valid_until) WHERE redeemed_at IS NULL;

-- The offer a purchase redeemed (its bonus is part of `points`), so an
-- order takes one offer at most.
ALTER TABLE orders ADD COLUMN offer_occasion text;

-- Members from before triggers existed: what they have reached is history.
-- The first batch that touches one marks its welcome, tier and milestones
-- silently and removes this mark.
INSERT INTO trigger_marks (member_id, mark, reached_at, announced)
SELECT member_id, 'legacy', created_at, false FROM members WHERE merged_into IS NULL;

-- Personalization: behaviour features per member, kept current in the
-- ledger transaction that books the purchase (never by a nightly batch),
-- the segments members are in, and the profiling opt-out.

-- Each order keeps what its counted lines came to, and how much of it was
-- sold at a discount (the mapping's `discounted`).
ALTER TABLE orders
    ADD COLUMN line_spend       numeric NOT NULL DEFAULT 0,
    ADD COLUMN discounted_spend numeric NOT NULL DEFAULT 0;

-- What a member's purchases add up to, kept by the statement triggers
-- below from every change of `orders` — whichever booking path wrote it
-- (set-wise, one by one, a merge, a replay) — with the changed rows only.
-- A purchase is an order with a member in stage placed or completed;
-- `monetary` sums their earn basis less what was refunded.
CREATE TABLE member_features (
    member_id         bigint PRIMARY KEY REFERENCES members (member_id),
    purchases         integer NOT NULL DEFAULT 0,
    monetary          numeric NOT NULL DEFAULT 0,
    first_purchase_at timestamptz,
    last_purchase_at  timestamptz,
    pos_purchases     integer NOT NULL DEFAULT 0,
    web_purchases     integer NOT NULL DEFAULT 0,
    app_purchases     integer NOT NULL DEFAULT 0,
    line_spend        numeric NOT NULL DEFAULT 0,
    discounted_spend  numeric NOT NULL DEFAULT 0,
    -- Orders not cancelled (placed, completed or refunded): what purchase
    -- milestones count, kept here so they need not count the orders.
    kept_orders       integer NOT NULL DEFAULT 0
);

-- Per member and product (the line's SKU): how often and how much, and the
-- last purchase times (at most 10, in the order booked) that give the
-- member's rhythm for the product. Written by the ledger at commit from
-- the lines of orders booked for the first time (lines are not stored). `category` is the mapping's brand or category
-- for the line, when it gives one.
CREATE TABLE member_products (
    member_id        bigint NOT NULL REFERENCES members (member_id),
    product          text   NOT NULL,
    category         text,
    purchases        integer NOT NULL,
    spend            numeric NOT NULL,
    discounted_spend numeric NOT NULL DEFAULT 0,
    first_at         timestamptz NOT NULL,
    last_at          timestamptz NOT NULL,
    recent           timestamptz[] NOT NULL,
    PRIMARY KEY (member_id, product)
);

-- The segments (`[[segments]]`) a member is in now, since when, and the
-- features that put it there (the explanation).
CREATE TABLE member_segments (
    member_id   bigint NOT NULL REFERENCES members (member_id),
    segment     text   NOT NULL,
    entered_at  timestamptz NOT NULL,
    features    jsonb  NOT NULL,
    PRIMARY KEY (member_id, segment)
);

-- CCPA ADMT / GDPR Art. 21-22: no profiling (no scores, no segments, only
-- offers for everyone). NULL: not stated.
ALTER TABLE member_profiles ADD COLUMN profiling_opt_out boolean;

-- The channel class of an order's channel (`pos:Berlin Mitte` → pos).
CREATE FUNCTION channel_class(channel text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN lower(split_part(coalesce(channel, ''), ':', 1));

-- Adds what the changed orders contribute now (`new_orders`) and takes
-- back what they contributed before (`old_orders`), per member, in one
-- statement. Where a purchase left (a cancellation, a merge), the first and
-- last purchase times are looked up again from that member's orders.
CREATE FUNCTION member_features_apply() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    -- `[personalization] enabled = false`: the ledger's connections say so.
    IF current_setting('loyalty.features', true) = 'off' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO member_features AS f (member_id, purchases, monetary, first_purchase_at, last_purchase_at,
                                          pos_purchases, web_purchases, app_purchases,
                                          line_spend, discounted_spend, kept_orders)
        SELECT member_id,
               count(*) FILTER (WHERE purchase),
               coalesce(sum(earn_basis - refunded) FILTER (WHERE purchase), 0),
               min(placed_at) FILTER (WHERE purchase), max(placed_at) FILTER (WHERE purchase),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'pos'),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'web'),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'app'),
               coalesce(sum(line_spend) FILTER (WHERE purchase), 0),
               coalesce(sum(discounted_spend) FILTER (WHERE purchase), 0),
               count(*)
          FROM (SELECT *, stage IN ('placed', 'completed') AS purchase FROM new_orders) n
         WHERE member_id IS NOT NULL AND stage <> 'cancelled'
         GROUP BY member_id
        ON CONFLICT (member_id) DO UPDATE SET
            purchases = f.purchases + EXCLUDED.purchases,
            monetary = f.monetary + EXCLUDED.monetary,
            first_purchase_at = least(f.first_purchase_at, EXCLUDED.first_purchase_at),
            last_purchase_at = greatest(f.last_purchase_at, EXCLUDED.last_purchase_at),
            pos_purchases = f.pos_purchases + EXCLUDED.pos_purchases,
            web_purchases = f.web_purchases + EXCLUDED.web_purchases,
            app_purchases = f.app_purchases + EXCLUDED.app_purchases,
            line_spend = f.line_spend + EXCLUDED.line_spend,
            discounted_spend = f.discounted_spend + EXCLUDED.discounted_spend,
            kept_orders = f.kept_orders + EXCLUDED.kept_orders;
        RETURN NULL;
    END IF;
    -- UPDATE (stage, refunds, merges): the difference, for members whose
    -- contribution changed (a completion changes nothing here).
    WITH contributions AS (
        SELECT member_id, 1 AS sign, stage IN ('placed', 'completed') AS purchase,
               earn_basis - refunded AS value, placed_at, channel_class(channel) AS class,
               line_spend AS lines, discounted_spend AS discounted
          FROM new_orders WHERE member_id IS NOT NULL AND stage <> 'cancelled'
        UNION ALL
        SELECT member_id, -1, stage IN ('placed', 'completed'),
               -(earn_basis - refunded), NULL, channel_class(channel), -line_spend, -discounted_spend
          FROM old_orders WHERE member_id IS NOT NULL AND stage <> 'cancelled'
    ), delta AS (
        SELECT member_id,
               coalesce(sum(sign) FILTER (WHERE purchase), 0) AS purchases,
               coalesce(sum(value) FILTER (WHERE purchase), 0) AS monetary,
               min(placed_at) FILTER (WHERE purchase) AS first_added,
               max(placed_at) FILTER (WHERE purchase) AS last_added,
               coalesce(sum(sign) FILTER (WHERE purchase AND class = 'pos'), 0) AS pos,
               coalesce(sum(sign) FILTER (WHERE purchase AND class = 'web'), 0) AS web,
               coalesce(sum(sign) FILTER (WHERE purchase AND class = 'app'), 0) AS app,
               coalesce(sum(lines) FILTER (WHERE purchase), 0) AS lines,
               coalesce(sum(discounted) FILTER (WHERE purchase), 0) AS discounted,
               sum(sign) AS kept
          FROM contributions GROUP BY member_id
    )
    INSERT INTO member_features AS f (member_id, purchases, monetary, first_purchase_at, last_purchase_at,
                                      pos_purchases, web_purchases, app_purchases, line_spend, discounted_spend,
                                      kept_orders)
    SELECT member_id, purchases, monetary, first_added, last_added, pos, web, app, lines, discounted, kept
      FROM delta
     WHERE purchases <> 0 OR monetary <> 0 OR pos <> 0 OR web <> 0 OR app <> 0
        OR lines <> 0 OR discounted <> 0 OR kept <> 0
    ON CONFLICT (member_id) DO UPDATE SET
        purchases = f.purchases + EXCLUDED.purchases,
        monetary = f.monetary + EXCLUDED.monetary,
        first_purchase_at = least(f.first_purchase_at, EXCLUDED.first_purchase_at),
        last_purchase_at = greatest(f.last_purchase_at, EXCLUDED.last_purchase_at),
        pos_purchases = f.pos_purchases + EXCLUDED.pos_purchases,
        web_purchases = f.web_purchases + EXCLUDED.web_purchases,
        app_purchases = f.app_purchases + EXCLUDED.app_purchases,
        line_spend = f.line_spend + EXCLUDED.line_spend,
        discounted_spend = f.discounted_spend + EXCLUDED.discounted_spend,
        kept_orders = f.kept_orders + EXCLUDED.kept_orders;
    -- A purchase that left a member (cancelled, refunded in full, moved by
    -- a merge) may have been its first or last: looked up again.
    UPDATE member_features f
       SET first_purchase_at = (SELECT min(placed_at) FROM orders o
                                 WHERE o.member_id = f.member_id AND o.stage IN ('placed', 'completed')),
           last_purchase_at = (SELECT max(placed_at) FROM orders o
                                WHERE o.member_id = f.member_id AND o.stage IN ('placed', 'completed'))
     WHERE f.member_id IN (
           SELECT o.member_id FROM old_orders o
            WHERE o.member_id IS NOT NULL AND o.stage IN ('placed', 'completed')
              AND NOT EXISTS (SELECT 1 FROM new_orders n
                               WHERE n.source = o.source AND n.order_ref = o.order_ref
                                 AND n.member_id = o.member_id AND n.stage IN ('placed', 'completed')));
    RETURN NULL;
END;
$$;

CREATE TRIGGER member_features_insert AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_orders
    FOR EACH STATEMENT EXECUTE FUNCTION member_features_apply();
CREATE TRIGGER member_features_update AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_orders NEW TABLE AS new_orders
    FOR EACH STATEMENT EXECUTE FUNCTION member_features_apply();

-- Every member's features counted from the orders at once: for ledgers
-- of earlier versions (below), and when personalization is turned on
-- again (`ledger::features::switch`). Expects `member_features` empty.
CREATE FUNCTION member_features_count_all() RETURNS bigint
    LANGUAGE sql AS $$
    WITH counted AS (
        INSERT INTO member_features (member_id, purchases, monetary, first_purchase_at, last_purchase_at,
                                     pos_purchases, web_purchases, app_purchases, line_spend, discounted_spend,
                                     kept_orders)
        SELECT member_id,
               count(*) FILTER (WHERE purchase),
               coalesce(sum(earn_basis - refunded) FILTER (WHERE purchase), 0),
               min(placed_at) FILTER (WHERE purchase), max(placed_at) FILTER (WHERE purchase),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'pos'),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'web'),
               count(*) FILTER (WHERE purchase AND channel_class(channel) = 'app'),
               coalesce(sum(line_spend) FILTER (WHERE purchase), 0),
               coalesce(sum(discounted_spend) FILTER (WHERE purchase), 0),
               count(*)
          FROM (SELECT *, stage IN ('placed', 'completed') AS purchase FROM orders) o
         WHERE member_id IS NOT NULL AND stage <> 'cancelled'
         GROUP BY member_id
        RETURNING 1
    )
    SELECT count(*) FROM counted;
$$;

-- The ledgers of earlier versions: their orders counted once.
SELECT member_features_count_all();

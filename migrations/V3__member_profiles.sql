-- Profile and consent of each member, as the sources state them (and, later,
-- the admin API). NULL: never stated. Owned by `ledger`. Delivery reads
-- consent before sending (no email without email consent, no SMS without
-- SMS consent) and the time zone for quiet hours.
CREATE TABLE member_profiles (
    member_id     bigint PRIMARY KEY REFERENCES members (member_id),
    email_opt_in  boolean,
    sms_opt_in    boolean,
    push_opt_in   boolean,
    timezone      text,
    locale        text,
    updated_at    timestamptz NOT NULL
);

-- Replenishment reminders (`replenishment_due`) are per member and
-- product: a scheduled row names what it is about in `subject` (the
-- product; '' for the kinds that are about the member as a whole).
ALTER TABLE scheduled_triggers ADD COLUMN subject text NOT NULL DEFAULT '';
ALTER TABLE scheduled_triggers DROP CONSTRAINT scheduled_triggers_pkey;
ALTER TABLE scheduled_triggers ADD PRIMARY KEY (member_id, kind, subject);
ALTER TABLE scheduled_triggers DROP CONSTRAINT scheduled_triggers_kind_check;
ALTER TABLE scheduled_triggers ADD CONSTRAINT scheduled_triggers_kind_check CHECK (kind IN (
    'lapse_risk', 'points_expiring', 'points_expiry', 'tier_review', 'tier_warning', 'replenishment'));

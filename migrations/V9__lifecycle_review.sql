-- `segments`: the time a member's lifecycle stage changes without a
-- purchase (new → active, active → at risk, at risk → lapsed): the
-- scheduler judges its segments again then, so `at_risk` is entered while
-- the member is silent, not at their next purchase.
ALTER TABLE scheduled_triggers DROP CONSTRAINT scheduled_triggers_kind_check;
ALTER TABLE scheduled_triggers ADD CONSTRAINT scheduled_triggers_kind_check CHECK (kind IN (
    'lapse_risk', 'points_expiring', 'points_expiry', 'tier_review', 'tier_warning', 'replenishment',
    'segments'));

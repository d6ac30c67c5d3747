//! Scheduled triggers on a controlled clock: lapse risk from the member's
//! own purchase rhythm (or N days), points expiring D days before the
//! balance expires for inactivity, the expiry itself; each occasion fires
//! once, also across restarts; a snapshot's history schedules nothing
//! already due.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use loyalty_cdc::config::Settings;
use loyalty_cdc::delivery::ManualClock;
use loyalty_cdc::ledger::db::Db;
use loyalty_cdc::ledger::orders::{self, NewOrder};
use loyalty_cdc::normalize::{OrderEvent, OrderStage};
use loyalty_cdc::triggers::schedule::{Pass, Scheduler};
use loyalty_cdc::triggers::{self, BatchFacts, Triggers};

use crate::support::PgDatabase;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap()
}

/// A member with completed orders at `t0 + days` (10 points each, all
/// available); returns its id.
async fn member_with_orders(db: &Db, days: &[i64]) -> i64 {
    let client = db.client();
    let id: i64 = client
        .query_one(
            "INSERT INTO members (created_at) VALUES ($1) RETURNING member_id",
            &[&t0()],
        )
        .await
        .unwrap()
        .get(0);
    let points = 10 * days.len() as i64;
    client
        .execute(
            "INSERT INTO balances (member_id, available, pending, lifetime, updated_at) VALUES ($1, $2, 0, $2, $3)",
            &[&id, &points, &t0()],
        )
        .await
        .unwrap();
    for day in days {
        let at = t0() + Duration::days(*day);
        let order = format!("{id}-{day}");
        client
            .execute(
                "INSERT INTO orders (source, order_ref, member_id, stage, earn_basis, grand_total, points, lines, placed_at, updated_at)
                 VALUES ('shop', $1, $2, 'completed', 10, 10, 10, 1, $3, $3)",
                &[&order, &id, &at],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO ledger_entries (member_id, kind, points, source, order_ref, effect_key, occurred_at)
                 VALUES ($1, 'earn_available', 10, 'shop', $2, 'shop:order:' || $2 || ':available', $3)",
                &[&id, &order, &at],
            )
            .await
            .unwrap();
    }
    id
}

async fn scheduled(db: &Db, member: i64) -> Vec<(String, DateTime<Utc>)> {
    db.client()
        .query(
            "SELECT kind, due_at FROM scheduled_triggers WHERE member_id = $1 ORDER BY kind",
            &[&member],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn outbox(db: &Db) -> Vec<(i64, String, serde_json::Value)> {
    db.client()
        .query(
            "SELECT member_id, trigger, payload->'trigger'->'data' FROM outbox ORDER BY created_at, member_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn lapse_and_expiry_fire_once_each_on_their_day() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("sched").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let db = Db::new(client);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(
        &path,
        format!(
            r#"[ledger]
url = "{url}"

[program.expiry]
inactivity_months = 12
warn_days = 30
{crm}
[[triggers.routes]]
trigger = "lapse_risk"
provider = "crm"

[[triggers.routes]]
trigger = "points_expiring"
provider = "crm"
"#,
            url = ledger_db.url(),
            crm = crate::support::webhook_provider("crm", "http://127.0.0.1:9/hook")
        ),
    )
    .unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let triggers: Arc<Triggers> = Triggers::from_settings(&settings);

    // A buys every 30 days (3 purchases: a rhythm); B bought once; C's one
    // purchase came with the initial snapshot.
    let a = member_with_orders(&db, &[0, 30, 60]).await;
    let b = member_with_orders(&db, &[0]).await;
    let c = member_with_orders(&db, &[0]).await;
    let mut facts = BatchFacts::default();
    facts.touched(a, true, t0() + Duration::days(60));
    facts.touched(b, true, t0());
    // The snapshot that copied C in ran 200 days after C's purchase.
    facts.touched(c, false, t0() + Duration::days(200));
    db.batch_execute("BEGIN").await.unwrap();
    triggers::record(&db, &triggers, facts).await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();

    let last_a = t0() + Duration::days(60);
    let a_expires = Utc.with_ymd_and_hms(2027, 3, 2, 10, 0, 0).unwrap();
    assert_eq!(
        scheduled(&db, a).await,
        [
            ("lapse_risk".to_string(), last_a + Duration::days(90)),
            (
                "points_expiring".to_string(),
                a_expires - Duration::days(30)
            ),
            ("points_expiry".to_string(), a_expires),
        ],
        "3 × her 30-day rhythm after her last purchase; expiry 12 months after her last activity"
    );
    assert_eq!(
        scheduled(&db, b).await[0],
        ("lapse_risk".to_string(), t0() + Duration::days(90)),
        "no rhythm yet: 90 days"
    );
    assert_eq!(
        scheduled(&db, c).await,
        [
            (
                "points_expiring".to_string(),
                Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).unwrap()
            ),
            (
                "points_expiry".to_string(),
                Utc.with_ymd_and_hms(2027, 1, 1, 10, 0, 0).unwrap()
            ),
        ],
        "the lapse was already due when the snapshot copied C in: not scheduled"
    );

    let clock = Arc::new(ManualClock::new(t0() + Duration::days(89)));
    let scheduler = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(
        scheduler.run_once().await.unwrap(),
        Pass::default(),
        "nothing due on day 89"
    );
    clock.set(t0() + Duration::days(90));
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
    let sent = outbox(&db).await;
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0, sent[0].1.as_str()), (b, "lapse_risk"));
    assert_eq!(sent[0].2["days_without_purchase"], 90);

    clock.set(last_a + Duration::days(90));
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
    let sent = outbox(&db).await;
    assert_eq!((sent[1].0, sent[1].1.as_str()), (a, "lapse_risk"));
    assert_eq!(sent[1].2["usual_interval_days"], 30.0);
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        0,
        "once per occasion"
    );
    let restarted = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(
        restarted.run_once().await.unwrap().fired,
        0,
        "also after a restart"
    );

    // Points expiring 30 days ahead, then the expiry itself. B and C (10
    // points each, last active on day 0) were warned on 2026-12-02 and
    // expired on 2027-01-01; A is warned 30 days before her own date.
    clock.set(a_expires - Duration::days(30));
    let mut pass = restarted.run_once().await.unwrap();
    pass.expired.sort_unstable();
    assert_eq!(pass.fired, 3);
    assert_eq!(pass.expired, [(b, 10), (c, 10)]);
    let warned: Vec<(i64, serde_json::Value)> = outbox(&db)
        .await
        .into_iter()
        .filter(|(_, kind, _)| kind == "points_expiring")
        .map(|(member, _, data)| (member, data["points"].clone()))
        .collect();
    assert_eq!(warned.len(), 3);
    assert!(warned.contains(&(a, serde_json::json!(30))));
    clock.set(a_expires);
    let pass = restarted.run_once().await.unwrap();
    assert_eq!(pass.expired, [(a, 30)]);
    let (available, expire_entry): (i64, i64) = {
        let row = db
            .client()
            .query_one(
                "SELECT b.available, (SELECT sum(points) FROM ledger_entries WHERE member_id = $1 AND kind = 'expire')::bigint
                   FROM balances b WHERE b.member_id = $1",
                &[&a],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((available, expire_entry), (0, -30));
    assert_eq!(
        outbox(&db).await.len(),
        5,
        "two lapses and three warnings: the expiry itself is no message"
    );
    assert!(scheduled(&db, a).await.is_empty());

    // A purchase after the lapse schedules a new occasion.
    db.client()
        .execute(
            "INSERT INTO orders (source, order_ref, member_id, stage, earn_basis, grand_total, points, lines, placed_at, updated_at)
             VALUES ('shop', 'again', $1, 'completed', 10, 10, 10, 1, $2, $2)",
            &[&a, &(a_expires + Duration::days(1))],
        )
        .await
        .unwrap();
    let mut facts = BatchFacts::default();
    facts.touched(a, true, a_expires + Duration::days(1));
    db.batch_execute("BEGIN").await.unwrap();
    triggers::record(&db, &triggers, facts).await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    let rows = scheduled(&db, a).await;
    assert_eq!(rows.len(), 1, "no points left: only the lapse: {rows:?}");
    assert_eq!(rows[0].0, "lapse_risk");
    assert!(rows[0].1 > a_expires + Duration::days(1));
}

#[tokio::test]
async fn members_from_before_triggers_reach_their_marks_silently() {
    let ledger_db = PgDatabase::create("legacy").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let db = Db::new(client);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\nurl = \"{}\"\n[program]\ntiers = [{{ name = \"base\", threshold = 0 }}, {{ name = \"gold\", threshold = 20 }}]\n[triggers.milestones]\npurchases = [1, 2]\n",
            ledger_db.url()
        ),
    )
    .unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let triggers: Arc<Triggers> = Triggers::from_settings(&settings);
    // Two members with the same history; one was in the ledger before
    // triggers existed (the migration marked it `legacy`).
    let old = member_with_orders(&db, &[0, 30]).await;
    let new = member_with_orders(&db, &[0, 30]).await;
    db.client()
        .execute(
            "UPDATE members SET tier = 'gold' WHERE member_id = ANY($1)",
            &[&vec![old, new]],
        )
        .await
        .unwrap();
    db.client()
        .execute(
            "INSERT INTO trigger_marks (member_id, mark, reached_at, announced) VALUES ($1, 'legacy', $2, false)",
            &[&old, &t0()],
        )
        .await
        .unwrap();
    let mut facts = BatchFacts::default();
    facts.touched(old, true, t0() + Duration::days(30));
    facts.touched(new, true, t0() + Duration::days(30));
    let fired = triggers::record(&db, &triggers, facts).await.unwrap();
    let mut fired: Vec<(i64, String)> = fired
        .iter()
        .map(|f| (f.member, f.occasion.clone()))
        .collect();
    fired.sort();
    assert_eq!(
        fired,
        [
            (new, format!("milestone:purchases:1:member:{new}")),
            (new, format!("milestone:purchases:2:member:{new}")),
            (new, format!("tier:gold:member:{new}")),
            (new, format!("welcome:member:{new}")),
        ],
        "the member from before fires nothing"
    );
    let silent: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM trigger_marks WHERE member_id = $1 AND NOT announced",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        silent, 4,
        "welcome, gold and both milestones, marked silently; `legacy` removed"
    );
}

/// Base, silver (100) and gold (300) qualifying per calendar year (30
/// grace and 30 warning days), `routes` to a webhook provider.
fn tier_settings(ledger_db: &PgDatabase, dir: &std::path::Path, routes: &[&str]) -> Settings {
    let path = dir.join("loyalty-cdc.toml");
    let mut config = format!(
        r#"[ledger]
url = "{url}"

[program]
tiers = [{{ name = "base", threshold = 0 }}, {{ name = "silver", threshold = 100 }}, {{ name = "gold", threshold = 300 }}]

[program.tier_period]
months = 12
grace_days = 30
warning_days = 30
{crm}"#,
        url = ledger_db.url(),
        crm = crate::support::webhook_provider("crm", "http://127.0.0.1:9/hook")
    );
    for trigger in routes {
        config.push_str(&format!(
            "\n[[triggers.routes]]\ntrigger = \"{trigger}\"\nprovider = \"crm\"\n"
        ));
    }
    std::fs::write(&path, config).unwrap();
    Settings::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// An order of `points` (rate 1) at `stage`.
fn order(reference: &str, points: i64, stage: OrderStage) -> OrderEvent {
    OrderEvent {
        order_ref: reference.into(),
        stage,
        earn_basis: points.into(),
        grand_total: points.into(),
        currency: None,
        channel: None,
        identifiers: Default::default(),
        lines: Vec::new(),
    }
}

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

async fn new_member(db: &Db, created: DateTime<Utc>) -> i64 {
    let id: i64 = db
        .client()
        .query_one(
            "INSERT INTO members (created_at) VALUES ($1) RETURNING member_id",
            &[&created],
        )
        .await
        .unwrap()
        .get(0);
    db.client()
        .execute(
            "INSERT INTO balances (member_id, updated_at) VALUES ($1, $2)",
            &[&id, &created],
        )
        .await
        .unwrap();
    id
}

async fn touch(db: &Db, triggers: &Triggers, members: &[i64], when: DateTime<Utc>) -> Vec<String> {
    let mut facts = BatchFacts::default();
    for member in members {
        facts.touched(*member, true, when);
    }
    db.batch_execute("BEGIN").await.unwrap();
    let fired = triggers::record(db, triggers, facts).await.unwrap();
    db.batch_execute("COMMIT").await.unwrap();
    // Tier triggers only (welcome fires too, unrouted here).
    fired
        .into_iter()
        .filter(|f| f.kind.as_str().starts_with("tier"))
        .map(|f| format!("{}:{}", f.kind.as_str(), f.member))
        .collect()
}

async fn tier_and_qualifying(db: &Db, member: i64) -> (String, i64) {
    let row = db
        .client()
        .query_one(
            "SELECT m.tier, b.qualifying FROM members m JOIN balances b USING (member_id) WHERE member_id = $1",
            &[&member],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn tiers_qualify_per_calendar_year_and_go_down_one_at_a_time_after_the_grace_days() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("tierperiod").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let db = Db::new(client);
    let dir = tempfile::tempdir().unwrap();
    let settings = tier_settings(
        &ledger_db,
        dir.path(),
        &["tier_upgrade", "tier_downgrade", "tier_downgrade_warning"],
    );
    let triggers: Arc<Triggers> = Triggers::from_settings(&settings);
    let program = &settings.program;

    // M and N reach gold with one purchase in 2025 (booked together);
    // L was gold before tier periods were configured.
    let m = new_member(&db, at(2025, 3, 1)).await;
    let n = new_member(&db, at(2025, 3, 1)).await;
    let l = new_member(&db, at(2024, 5, 1)).await;
    db.client()
        .execute(
            "UPDATE members SET tier = 'gold' WHERE member_id = $1",
            &[&l],
        )
        .await
        .unwrap();
    let (m1, n1) = (
        order("m1", 350, OrderStage::Completed),
        order("n1", 350, OrderStage::Completed),
    );
    let booked = orders::apply_new_orders(
        &db,
        program,
        "shop",
        &[
            NewOrder {
                order: &m1,
                member: m,
                at: at(2025, 3, 1),
            },
            NewOrder {
                order: &n1,
                member: n,
                at: at(2025, 3, 1),
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(booked, [true, true]);
    let mut fired = touch(&db, &triggers, &[m, n], at(2025, 3, 1)).await;
    fired.sort();
    assert_eq!(
        fired,
        [format!("tier_upgrade:{m}"), format!("tier_upgrade:{n}")]
    );
    assert_eq!(tier_and_qualifying(&db, m).await, ("gold".into(), 350));
    assert_eq!(
        scheduled(&db, m).await,
        [
            (
                "tier_review".to_string(),
                Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap()
            ),
            (
                "tier_warning".to_string(),
                Utc.with_ymd_and_hms(2025, 12, 2, 0, 0, 0).unwrap()
            ),
        ],
        "the 2025 review 30 days after its end, the warning 30 days before"
    );

    // The first pass gives L, gold from before periods, the 2025 review.
    let clock = Arc::new(ManualClock::new(at(2025, 11, 1)));
    let scheduler = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(scheduler.run_once().await.unwrap().fired, 0);
    assert_eq!(scheduled(&db, l).await.len(), 2);

    // December 2nd: only L, with no points this year, is warned; M and N
    // are on track.
    clock.set(Utc.with_ymd_and_hms(2025, 12, 2, 0, 0, 0).unwrap());
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
    let sent = outbox(&db).await;
    assert_eq!(
        (sent[2].0, sent[2].1.as_str()),
        (l, "tier_downgrade_warning")
    );
    assert_eq!(sent[2].2["points_needed"], 300);
    assert_eq!(sent[2].2["falls_to"], "silver");

    // The 2025 review: M and N keep gold for 2026; L goes down one tier.
    clock.set(Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap());
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
    let sent = outbox(&db).await;
    assert_eq!((sent[3].0, sent[3].1.as_str()), (l, "tier_downgrade"));
    assert_eq!(sent[3].2["tier"], "silver");
    assert_eq!(sent[3].2["previous_tier"], "gold");
    assert_eq!(tier_and_qualifying(&db, m).await.0, "gold");

    // 2026: M buys for 50 points in March (the count starts afresh) and
    // places an order of 120 in December that completes in January: it
    // counts for 2026, the year it was placed.
    orders::apply_order(
        &db,
        program,
        "shop",
        &order("m2", 50, OrderStage::Completed),
        Some(m),
        at(2026, 3, 10),
    )
    .await
    .unwrap();
    assert_eq!(
        touch(&db, &triggers, &[m], at(2026, 3, 10)).await,
        Vec::<String>::new()
    );
    assert_eq!(tier_and_qualifying(&db, m).await, ("gold".into(), 50));
    clock.set(Utc.with_ymd_and_hms(2026, 12, 2, 0, 0, 0).unwrap());
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        3,
        "M, N and L warned"
    );
    let warning = &outbox(&db).await[4..];
    let of_m = warning.iter().find(|(member, _, _)| *member == m).unwrap();
    assert_eq!(of_m.2["qualifying_points"], 50);
    assert_eq!(of_m.2["points_needed"], 250);
    orders::apply_order(
        &db,
        program,
        "shop",
        &order("m3", 120, OrderStage::Placed),
        Some(m),
        at(2026, 12, 20),
    )
    .await
    .unwrap();
    orders::apply_order(
        &db,
        program,
        "shop",
        &order("m3", 120, OrderStage::Completed),
        Some(m),
        at(2027, 1, 10),
    )
    .await
    .unwrap();
    touch(&db, &triggers, &[m], at(2027, 1, 10)).await;
    assert_eq!(tier_and_qualifying(&db, m).await, ("gold".into(), 170));

    // The 2026 review: M (170 points) and N (none) go down one tier, to
    // silver, not further; L (silver, no points) to base.
    clock.set(Utc.with_ymd_and_hms(2027, 1, 31, 0, 0, 0).unwrap());
    assert_eq!(scheduler.run_once().await.unwrap().fired, 3);
    let downgrades = &outbox(&db).await[7..];
    let tier_of = |member: i64| {
        let (_, kind, data) = downgrades
            .iter()
            .find(|(who, _, _)| *who == member)
            .unwrap();
        assert_eq!(kind, "tier_downgrade");
        (
            data["tier"].as_str().unwrap().to_string(),
            data["qualifying_points"].as_i64().unwrap(),
        )
    };
    assert_eq!(tier_of(m), ("silver".into(), 170));
    assert_eq!(tier_of(n), ("silver".into(), 0));
    assert_eq!(tier_of(l), ("base".into(), 0));
    assert!(
        scheduled(&db, l).await.is_empty(),
        "the entry tier is not reviewed"
    );
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        0,
        "once per occasion"
    );
    let restarted = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(
        restarted.run_once().await.unwrap().fired,
        0,
        "also after a restart"
    );

    // N's 350 points of 2025 qualify for nothing in 2027: a purchase
    // placed (pending) does not bring gold back.
    orders::apply_order(
        &db,
        program,
        "shop",
        &order("n2", 20, OrderStage::Placed),
        Some(n),
        at(2027, 2, 1),
    )
    .await
    .unwrap();
    assert_eq!(tier_and_qualifying(&db, n).await.0, "silver");

    // M reaches gold again in 2027: an upgrade again, from silver.
    orders::apply_order(
        &db,
        program,
        "shop",
        &order("m4", 400, OrderStage::Completed),
        Some(m),
        at(2027, 3, 1),
    )
    .await
    .unwrap();
    assert_eq!(tier_and_qualifying(&db, m).await, ("gold".into(), 400));
    assert_eq!(
        touch(&db, &triggers, &[m], at(2027, 3, 1)).await,
        [format!("tier_upgrade:{m}")]
    );
    let upgrade = outbox(&db).await.pop().unwrap();
    assert_eq!(upgrade.2["previous_tier"], "silver");

    // The 2027 review: M keeps gold; N, who never came back, goes to base.
    clock.set(Utc.with_ymd_and_hms(2028, 1, 31, 0, 0, 0).unwrap());
    restarted.run_once().await.unwrap();
    assert_eq!(tier_and_qualifying(&db, m).await.0, "gold");
    assert_eq!(tier_and_qualifying(&db, n).await.0, "base");
    assert!(scheduled(&db, n).await.is_empty());
}

#[tokio::test]
async fn turning_tier_periods_on_counts_the_current_period_from_the_entries() {
    let ledger_db = PgDatabase::create("tiercount").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let db = Db::new(client);
    let now = Utc::now();
    let program: loyalty_cdc::config::ProgramSettings = toml::from_str(
        r#"tiers = [{ name = "base", threshold = 0 }, { name = "gold", threshold = 300 }]
tier_period = { months = 12 }"#,
    )
    .unwrap();
    // A member from before periods: 300 points placed last year, 200 now;
    // its count is the lifetime (500), of no period.
    let member = new_member(&db, now - Duration::days(400)).await;
    for (reference, points, placed) in [
        ("old", 300i64, now - Duration::days(370)),
        ("new", 200, now),
    ] {
        db.client()
            .execute(
                "INSERT INTO orders (source, order_ref, member_id, stage, earn_basis, grand_total, points, lines, placed_at, updated_at)
                 VALUES ('shop', $1, $2, 'completed', $3::bigint::numeric, $3::bigint::numeric, $3, 1, $4, $4)",
                &[&reference, &member, &points, &placed],
            )
            .await
            .unwrap();
        db.client()
            .execute(
                "INSERT INTO ledger_entries (member_id, kind, points, source, order_ref, effect_key, occurred_at)
                 VALUES ($1, 'earn_available', $2, 'shop', $3, 'shop:order:' || $3 || ':available', $4)",
                &[&member, &points, &reference, &placed],
            )
            .await
            .unwrap();
    }
    db.client()
        .execute(
            "UPDATE balances SET available = 500, lifetime = 500, qualifying = 500 WHERE member_id = $1",
            &[&member],
        )
        .await
        .unwrap();
    let counted = loyalty_cdc::ledger::tiers::count_current_period(db.client(), &program, now)
        .await
        .unwrap();
    assert_eq!(counted, 1);
    let (qualifying, since): (i64, DateTime<Utc>) = {
        let row = db
            .client()
            .query_one(
                "SELECT qualifying, qualifying_since FROM balances WHERE member_id = $1",
                &[&member],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(qualifying, 200, "this year's points only");
    assert_eq!(
        since,
        Utc.with_ymd_and_hms(now.year(), 1, 1, 0, 0, 0).unwrap()
    );
    assert_eq!(
        loyalty_cdc::ledger::tiers::count_current_period(db.client(), &program, now)
            .await
            .unwrap(),
        0,
        "once"
    );
}

#[tokio::test]
async fn a_scheduler_back_from_an_outage_sends_nothing_about_long_past_periods() {
    let ledger_db = PgDatabase::create("tieroutage").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let db = Db::new(client);
    let dir = tempfile::tempdir().unwrap();
    let settings = tier_settings(
        &ledger_db,
        dir.path(),
        &["tier_downgrade", "tier_downgrade_warning"],
    );
    let triggers: Arc<Triggers> = Triggers::from_settings(&settings);
    let member = new_member(&db, at(2025, 3, 1)).await;
    let gold = order("g1", 350, OrderStage::Completed);
    orders::apply_new_orders(
        &db,
        &settings.program,
        "shop",
        &[NewOrder {
            order: &gold,
            member,
            at: at(2025, 3, 1),
        }],
    )
    .await
    .unwrap();
    touch(&db, &triggers, &[member], at(2025, 3, 1)).await;
    assert_eq!(tier_and_qualifying(&db, member).await.0, "gold");

    // The scheduler is down from before the 2025 warning until March 2027.
    // Back, it applies the 2025 review (keeps gold: 350 points) and the
    // 2026 one (down to silver), and sends the one notice still timely.
    let clock = Arc::new(ManualClock::new(at(2027, 3, 1)));
    let scheduler = Scheduler::new(&settings, Arc::clone(&triggers), clock);
    scheduler.run_once().await.unwrap();
    assert_eq!(tier_and_qualifying(&db, member).await.0, "silver");
    let sent = outbox(&db).await;
    let kinds: Vec<&str> = sent.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["tier_downgrade"],
        "no warning about 2025 or 2026, one notice: {sent:?}"
    );
    assert_eq!(sent[0].2["previous_tier"], "gold");
    assert_eq!(sent[0].2["tier"], "silver");
}

#[tokio::test]
async fn a_member_who_buys_every_30_days_is_reminded_once_on_day_28_and_not_after_buying_early() {
    let (_ledger_db, db, settings, triggers) = crate::support::migrated_ledger(
        r#"
[[triggers.routes]]
trigger = "replenishment_due"
provider = "crm"

[[offers]]
code = "REFILL-50"
title = "50 bonus points on your refill"
triggers = ["replenishment_due"]
bonus_points = 50
valid_days = 7
"#,
    )
    .await;
    let day = |d: i64| t0() + Duration::days(d);

    // A buys coffee on days 0, 30 and 60: next expected on day 90, reminded
    // on day 88. B buys the same way but comes back early, on day 80. C
    // bought twice only (no rhythm yet), and D objected to profiling.
    let (a, b, c, d) = (
        new_member(&db, t0()).await,
        new_member(&db, t0()).await,
        new_member(&db, t0()).await,
        new_member(&db, t0()).await,
    );
    db.client()
        .execute(
            "INSERT INTO member_profiles (member_id, profiling_opt_out, updated_at) VALUES ($1, true, $2)",
            &[&d, &t0()],
        )
        .await
        .unwrap();
    for (member, days) in [
        (a, vec![0, 30, 60]),
        (b, vec![0, 30, 60, 80]),
        (c, vec![0, 30]),
        (d, vec![0, 30, 60]),
    ] {
        for n in &days {
            crate::support::book_purchase(
                &db,
                &triggers,
                member,
                &format!("{member}-{n}"),
                &["COFFEE-1KG"],
                day(*n),
            )
            .await;
        }
    }
    let due: Vec<(i64, String, DateTime<Utc>)> = db
        .client()
        .query(
            "SELECT member_id, subject, due_at FROM scheduled_triggers WHERE kind = 'replenishment' ORDER BY member_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        due,
        [
            (a, "COFFEE-1KG".to_string(), day(88)),
            // B's usual interval: the median of 30, 30 and 20 is 30; from
            // day 80, due on day 108.
            (b, "COFFEE-1KG".to_string(), day(108)),
        ],
        "C has no rhythm yet; D is not predicted"
    );

    let clock = Arc::new(ManualClock::new(day(87)));
    let scheduler = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        0,
        "nothing on day 87"
    );
    clock.set(day(88));
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
    clock.set(day(100));
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        0,
        "once per occasion; B bought early: nothing for B's day 88"
    );
    let sent = db
        .client()
        .query(
            "SELECT member_id, payload FROM outbox WHERE trigger = 'replenishment_due'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].get::<_, i64>(0), a);
    let payload: serde_json::Value = sent[0].get(1);
    assert_eq!(payload["trigger"]["data"]["product"], "COFFEE-1KG");
    assert_eq!(payload["trigger"]["data"]["usual_interval_days"], 30.0);
    assert_eq!(payload["trigger"]["data"]["purchases"], 3);
    assert_eq!(
        payload["offer"]["code"], "REFILL-50",
        "with the bonus points offer"
    );
    // B is reminded of the next cycle instead.
    clock.set(day(108));
    assert_eq!(scheduler.run_once().await.unwrap().fired, 1);
}

#[tokio::test]
async fn a_silent_member_is_at_risk_when_their_probability_alive_falls_and_lapsed_later() {
    let (_ledger_db, db, settings, triggers) = crate::support::migrated_ledger(
        r#"
[triggers.lapse]
by = "probability"

[[triggers.routes]]
trigger = "lapse_risk"
provider = "crm"

[[triggers.routes]]
trigger = "segment_entered"
provider = "crm"

[[segments]]
name = "at_risk"
when = "features.lifecycle == 'at_risk'"
"#,
    )
    .await;
    let day = |d: f64| t0() + Duration::seconds((d * 86_400.0).round() as i64);

    // Every 30 days, six times: the last on day 150.
    let member = new_member(&db, t0()).await;
    for n in 0..6 {
        crate::support::book_purchase(
            &db,
            &triggers,
            member,
            &format!("p{n}"),
            &["COFFEE-1KG"],
            day(30.0 * n as f64),
        )
        .await;
    }
    // P(alive) falls below 0.5 at the age the model gives (about day
    // 246: 96 days of silence after a 30-day rhythm), below 0.2 later.
    let model = &settings.personalization.model;
    let at_risk = day(model.age_at(0.5, 5.0, 150.0));
    let lapsed = day(model.age_at(0.2, 5.0, 150.0));
    assert!(at_risk > day(246.0) && at_risk < day(247.0), "{at_risk}");
    // The segment review planned at the first purchase (the end of `new`,
    // day 60) stays: purchases move a review only sooner. Reviewing then
    // finds nothing changed and plans the next one.
    assert_eq!(
        scheduled(&db, member).await,
        [
            ("lapse_risk".to_string(), at_risk),
            ("segments".to_string(), day(60.0))
        ]
    );

    let clock = Arc::new(ManualClock::new(at_risk - Duration::hours(1)));
    let scheduler = Scheduler::new(&settings, Arc::clone(&triggers), clock.clone());
    assert_eq!(scheduler.run_once().await.unwrap().fired, 0);
    assert_eq!(
        scheduled(&db, member).await,
        [
            ("lapse_risk".to_string(), at_risk),
            ("segments".to_string(), at_risk)
        ]
    );
    clock.set(at_risk);
    assert_eq!(scheduler.run_once().await.unwrap().fired, 2);
    let sent = outbox(&db).await;
    let kinds: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(kinds.len(), 2);
    assert!(
        kinds.contains(&"lapse_risk") && kinds.contains(&"segment_entered"),
        "{kinds:?}"
    );
    let entered = sent.iter().find(|s| s.1 == "segment_entered").unwrap();
    assert_eq!(entered.2["segment"], "at_risk");
    assert_eq!(entered.2["features"]["lifecycle"], "at_risk");
    let lapse = sent.iter().find(|s| s.1 == "lapse_risk").unwrap();
    assert_eq!(lapse.2["p_alive"], 0.5);
    assert_eq!(lapse.2["days_without_purchase"], 96);
    // The next review is when the member lapses: out of `at_risk` then.
    assert_eq!(
        scheduled(&db, member).await,
        [("segments".to_string(), lapsed)]
    );
    clock.set(lapsed);
    assert_eq!(
        scheduler.run_once().await.unwrap().fired,
        0,
        "leaving fires nothing"
    );
    let segments: i64 = db
        .client()
        .query_one("SELECT count(*) FROM member_segments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(segments, 0);
    assert_eq!(
        scheduled(&db, member).await,
        [],
        "lapsed: nothing left to change"
    );
}

#[tokio::test]
async fn purchases_in_quick_succession_move_the_segment_review_only_by_more_than_a_day() {
    let (_ledger_db, db, settings, triggers) = crate::support::migrated_ledger(
        r#"
[[segments]]
name = "at_risk"
when = "features.lifecycle == 'at_risk'"
"#,
    )
    .await;
    let day = |d: f64| t0() + Duration::seconds((d * 86_400.0).round() as i64);
    let model = &settings.personalization.model;
    // When the stage next changes after k + 1 purchases an hour apart:
    // the end of `new` (day 60) or P(alive) below 0.5 or 0.2, whichever
    // comes first. More purchases in the same span read as a faster
    // rhythm, so each brings the change closer.
    let exact = |k: usize| {
        let last = k as f64 / 24.0;
        [
            day(60.0),
            day(model.age_at(0.5, k as f64, last)),
            day(model.age_at(0.2, k as f64, last)),
        ]
        .into_iter()
        .min()
        .unwrap()
    };
    let member = new_member(&db, t0()).await;
    let mut planned = exact(0);
    let mut kept_within_slack = 0;
    for k in 0..30 {
        crate::support::book_purchase(
            &db,
            &triggers,
            member,
            &format!("p{k}"),
            &["COFFEE-1KG"],
            t0() + Duration::hours(k as i64),
        )
        .await;
        let next = exact(k);
        if next < planned - Duration::hours(24) {
            planned = next;
        } else if next < planned {
            kept_within_slack += 1;
        }
        let review = scheduled(&db, member)
            .await
            .into_iter()
            .find(|(kind, _)| kind == "segments")
            .map(|(_, at)| at);
        assert_eq!(review, Some(planned), "after purchase {k}");
        // Never more than a day after the change.
        assert!(planned - next <= Duration::hours(24), "after purchase {k}");
    }
    // The burst moved the review several times and left it alone when
    // the change came less than a day sooner.
    assert!(planned < day(30.0), "{planned}");
    assert!(kept_within_slack > 0, "the slack was never used");
}

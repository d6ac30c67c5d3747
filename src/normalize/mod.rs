//! Source transactions → member events, by declarative mappings
//! (`connectors/sources/*.toml`), so an operator adapts to a customised
//! schema without touching Rust.
//!
//! - `mapping.rs`: the file format and its compilation (every problem named
//!   with file, key and fix).
//! - `expr.rs`: CEL expressions over a row and what is joined to it.
//! - this file: the [`MemberEvent`]s and the [`Normalizer`] that turns one
//!   whole [`SourceTxn`] into them.
//!
//! One source transaction is normalized as a whole: reference rows first
//! (so an order sees the customer created with it), then orders and
//! refunds in source order, each with its lines from the same transaction.
//! State *transitions* (Odoo `paid` → `done` is one sale) are judged by the
//! ledger against the order's last known stage, which it keeps for every
//! source whether or not that source sends before-images.

pub mod expr;
pub mod mapping;
pub mod replay;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::source::{Change, ConsumerError, Op, SourceTxn, TxnKind, Value};
use expr::{json_val, list, plain_json, row_map, row_val, Scope};
use mapping::{AmountValue, Lines, Mapping, StatusMeaning};

/// Lines kept per document. Beyond this a document's lines are counted but
/// not itemized (its amounts come from the header): a bound on memory for
/// bulk transactions.
pub const MAX_LINES_PER_DOCUMENT: usize = 1_000;

/// Identifiers as the source holds them; `identity` normalizes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawIdentifiers {
    /// The source's own customer id.
    pub customer: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub card: Option<String>,
}

/// Where an order stands, as its status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OrderStage {
    Placed,
    Completed,
    Cancelled,
    Refunded,
}

impl OrderStage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Refunded => "refunded",
        }
    }
}

/// One counted line of an order or refund.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub sku: Option<String>,
    #[serde(with = "crate::source::change::decimal_text")]
    pub quantity: Decimal,
    #[serde(with = "crate::source::change::decimal_text")]
    pub amount: Decimal,
    /// Sold at a discount (the mapping's `discounted`; false without one).
    #[serde(default)]
    pub discounted: bool,
    /// Brand or category (the mapping's `category`).
    #[serde(default)]
    pub category: Option<String>,
}

/// An order as it now stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OrderEvent {
    pub order_ref: String,
    pub stage: OrderStage,
    #[serde(with = "crate::source::change::decimal_text")]
    pub earn_basis: Decimal,
    #[serde(with = "crate::source::change::decimal_text")]
    pub grand_total: Decimal,
    pub currency: Option<String>,
    pub channel: Option<String>,
    pub identifiers: RawIdentifiers,
    pub lines: Vec<Line>,
}

impl OrderEvent {
    /// What its counted lines came to.
    pub fn line_spend(&self) -> Decimal {
        self.lines.iter().map(|l| l.amount).sum()
    }

    /// What of that was sold at a discount.
    pub fn discounted_spend(&self) -> Decimal {
        self.lines
            .iter()
            .filter(|l| l.discounted)
            .map(|l| l.amount)
            .sum()
    }
}

/// A refund booked against an order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefundEvent {
    pub refund_ref: String,
    pub order_ref: String,
    /// Refunded amount, positive.
    #[serde(with = "crate::source::change::decimal_text")]
    pub amount: Decimal,
    /// `amount` is a part of the order's grand total (else of its earn
    /// basis).
    pub of_grand_total: bool,
    pub lines: Vec<Line>,
}

/// Profile and consent as a source states them; `None`: not stated (what
/// the ledger knows stays).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub email_opt_in: Option<bool>,
    pub sms_opt_in: Option<bool>,
    pub push_opt_in: Option<bool>,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    /// Device registration token for push messages.
    pub push_token: Option<String>,
    /// LINE user id for LINE messages.
    pub line_user_id: Option<String>,
    /// Objected to profiling (CCPA ADMT, GDPR Art. 21/22).
    pub profiling_opt_out: Option<bool>,
}

/// A customer account or contact, new or changed: enrollment, profile,
/// consent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CustomerEvent {
    pub customer_ref: String,
    pub identifiers: RawIdentifiers,
    pub profile: Profile,
}

/// Points spent, recorded at the source.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RedemptionEvent {
    pub redemption_ref: String,
    pub points: i64,
    pub identifiers: RawIdentifiers,
}

/// A wishlist item, put on or taken off.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WishlistEvent {
    pub item_ref: String,
    pub change: WishlistChange,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WishlistChange {
    /// On the wishlist of the member these identifiers name.
    Added {
        product: String,
        identifiers: RawIdentifiers,
    },
    /// Deleted at the source.
    Removed,
}

/// What a product costs now, as the shop states it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriceEvent {
    pub product: String,
    #[serde(with = "crate::source::change::decimal_text")]
    pub price: Decimal,
    pub sku: Option<String>,
    pub currency: Option<String>,
}

/// What happened, in loyalty terms. (Variants are only ever appended:
/// quarantined events are stored by variant index.)
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum MemberEvent {
    Order(OrderEvent),
    Refund(RefundEvent),
    Customer(CustomerEvent),
    Redemption(RedemptionEvent),
    Wishlist(WishlistEvent),
    Price(PriceEvent),
}

/// The identifiers a document's expressions give; one that cannot be read
/// is absent (identifiers are optional by nature).
fn raw_identifiers(exprs: &mapping::IdentifierExprs, scope: &Scope) -> RawIdentifiers {
    let text = |expr: &Option<expr::Expr>| {
        expr.as_ref()
            .and_then(|e| e.text_value(scope).ok().flatten())
    };
    RawIdentifiers {
        customer: text(&exprs.customer),
        email: text(&exprs.email),
        phone: text(&exprs.phone),
        card: text(&exprs.card),
    }
}

/// Where an event or a quarantined row came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub source: Arc<str>,
    pub table: String,
    pub position: String,
    /// Source commit time: business time.
    pub occurred_at: DateTime<Utc>,
    /// From the change stream, not a snapshot's copy of history: only
    /// live changes fire triggers.
    pub live: bool,
}

/// A row that could not be mapped: kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub origin: Origin,
    pub op: Op,
    pub reason: String,
    /// The row as JSON. May hold PII: stored, never logged.
    pub row: serde_json::Value,
    /// What `quarantine replay` books once the cause is fixed.
    pub replay: replay::Replay,
}

/// The result of normalizing one source transaction, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Event(MemberEvent, Origin),
    Quarantine(Quarantined),
}

/// `(reference, key, row)`; `None` for a deleted row.
pub type ReferenceRow = (
    String,
    String,
    Option<serde_json::Map<String, serde_json::Value>>,
);

/// Reference data (`[[references]]`) as the ledger stores it, written and
/// read inside the transaction that applies the source transaction.
pub trait References: Send {
    fn get(
        &mut self,
        reference: &str,
        key: &str,
    ) -> impl Future<
        Output = Result<Option<serde_json::Map<String, serde_json::Value>>, ConsumerError>,
    > + Send;

    /// Sets one field of a row, creating the row if needed (key/value
    /// tables, gathered field by field).
    fn merge(
        &mut self,
        reference: &str,
        key: &str,
        field: &str,
        value: serde_json::Value,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send;

    /// Writes whole rows, `(reference, key, row)`, at most one per
    /// reference and key; `None` removes the row (a delete at the source).
    fn put_all(
        &mut self,
        rows: Vec<ReferenceRow>,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send;
}

/// Turns whole source transactions into member events with one mapping.
#[derive(Debug, Clone)]
pub struct Normalizer {
    mapping: Arc<Mapping>,
    /// Per mapped table (as written in the mapping): the columns it must
    /// have and the mapping key that needs each.
    required: Arc<HashMap<String, Vec<(String, String)>>>,
    /// Tables already reported as parked (logged once, not per row).
    parked: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Per order and per refund mapping: whether its expressions read
    /// `before` / `lines`. Handing CEL a variable costs a conversion of
    /// every value in it, so only what is read is handed over.
    order_uses: Arc<Vec<Uses>>,
    refund_uses: Arc<Vec<Uses>>,
    /// What the line expressions of each order and refund mapping read.
    order_line_uses: Arc<Vec<Uses>>,
    refund_line_uses: Arc<Vec<Uses>>,
    price_uses: Arc<Vec<Uses>>,
    wishlist_uses: Arc<Vec<Uses>>,
}

/// Which optional variables a document's expressions read.
#[derive(Debug, Clone, Default)]
struct Uses {
    before: bool,
    lines: bool,
    /// The columns of `row` (and `before`) read; `None`: all.
    columns: Option<Arc<std::collections::HashSet<String>>>,
}

impl Uses {
    /// What a document's expressions read; `amounts` are the columns its
    /// exact sums read (those are taken from the row directly).
    fn of<'a>(exprs: impl IntoIterator<Item = Option<&'a expr::Expr>>) -> Self {
        let mut uses = Self::default();
        let mut columns = std::collections::HashSet::new();
        let mut all = false;
        for expr in exprs.into_iter().flatten() {
            uses.before |= expr.text().contains("before");
            uses.lines |= expr.text().contains("lines");
            all |= expr.uses_whole("row") || expr.uses_whole("before");
            columns.extend(expr.columns_of("row"));
            columns.extend(expr.columns_of("before"));
        }
        uses.columns = (!all).then(|| Arc::new(columns));
        uses
    }

    fn all() -> Self {
        Self {
            before: true,
            lines: false,
            columns: None,
        }
    }
}

/// A table's name as mappings write it: `table` (PostgreSQL schema
/// `public`, or any MySQL database) or `schema.table`.
fn table_matches(written: &str, change: &Change) -> bool {
    match written.split_once('.') {
        Some((schema, name)) => schema == change.table.schema && name == change.table.name,
        None => written == change.table.name,
    }
}

/// What one change does to a reference table.
enum ReferenceUpdate {
    /// The whole row (`None`: deleted).
    Row(Option<serde_json::Map<String, serde_json::Value>>),
    /// One field of a key/value ("pivot") table.
    Field(String, serde_json::Value),
}

/// The key and the update a change makes to `reference`, if any.
fn reference_update(
    reference: &mapping::Reference,
    change: &Change,
) -> Option<(String, ReferenceUpdate)> {
    let image = change.after.as_ref().or(change.before.as_ref())?;
    let cell = |column: &str| {
        change
            .table
            .column_index(column)
            .and_then(|i| image.0.get(i))
    };
    let key = cell(&reference.key).and_then(key_text)?;
    if let Some((name_column, value_column)) = &reference.pivot {
        // One field of the entity: kept if the mapping lists it.
        let field = cell(name_column).and_then(key_text)?;
        if !reference.columns.contains(&field) {
            return None;
        }
        let value = match change.op {
            Op::Delete => serde_json::Value::Null,
            Op::Truncate => return None,
            Op::Insert | Op::Update => {
                cell(value_column).map_or(serde_json::Value::Null, plain_json)
            }
        };
        return Some((key, ReferenceUpdate::Field(field, value)));
    }
    let row = match change.op {
        Op::Delete => None,
        Op::Truncate => return None,
        Op::Insert | Op::Update => change.after.as_ref().map(|after| {
            reference
                .columns
                .iter()
                .map(|column| {
                    let value = change
                        .table
                        .column_index(column)
                        .and_then(|i| after.0.get(i))
                        .map_or(serde_json::Value::Null, plain_json);
                    (column.clone(), value)
                })
                .collect()
        }),
    };
    Some((key, ReferenceUpdate::Row(row)))
}

/// A key column's value as text (`42`, `abc`); `None` for NULL.
fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::Null | Value::Absent | Value::UnchangedToast => None,
        Value::Int(i) => Some(i.to_string()),
        Value::Numeric(d) => Some(d.normalize().to_string()),
        Value::Text(s) => Some(s.clone()),
        Value::Uuid(u) => Some(u.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(plain_json(other).to_string()),
    }
}

/// Joined reference rows of one document, by join name (`None`: no row).
type Joined = HashMap<String, Option<serde_json::Map<String, serde_json::Value>>>;

/// A term of an exact sum: the document's column or a joined row's.
fn term_value(doc: &Document<'_>, joined: &Joined, term: &mapping::Term) -> Option<AmountValue> {
    match &term.join {
        None => amount_value(doc.value(&term.column)),
        Some(join) => {
            let row = joined.get(join)?.as_ref()?;
            Some(match row.get(&term.column) {
                None | Some(serde_json::Value::Null) => AmountValue::Null,
                Some(serde_json::Value::Number(n)) => n
                    .to_string()
                    .parse()
                    .map_or(AmountValue::Unparsable, AmountValue::Number),
                Some(serde_json::Value::String(s)) => s
                    .trim()
                    .parse()
                    .map_or(AmountValue::Unparsable, AmountValue::Number),
                Some(_) => AmountValue::Unparsable,
            })
        }
    }
}

fn amount_value(value: Option<&Value>) -> Option<AmountValue> {
    Some(match value? {
        Value::Null | Value::Absent | Value::UnchangedToast => AmountValue::Null,
        Value::Int(i) => AmountValue::Number(Decimal::from(*i)),
        Value::Numeric(d) => AmountValue::Number(*d),
        Value::Float(f) => {
            Decimal::try_from(*f).map_or(AmountValue::Unparsable, AmountValue::Number)
        }
        Value::Text(s) => s
            .trim()
            .parse()
            .map_or(AmountValue::Unparsable, AmountValue::Number),
        _ => AmountValue::Unparsable,
    })
}

impl Normalizer {
    pub fn new(mapping: Arc<Mapping>) -> Self {
        let mut required: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (table, column, key) in mapping.required_columns() {
            let columns = required.entry(table).or_default();
            if !columns.iter().any(|(c, _)| *c == column) {
                columns.push((column, key));
            }
        }
        let order_uses = mapping
            .orders
            .iter()
            .map(|o| {
                Uses::of(
                    [
                        o.when.as_ref(),
                        Some(&o.status),
                        o.currency.as_ref(),
                        o.channel.as_ref(),
                        o.customer.as_ref(),
                        o.email.as_ref(),
                        o.phone.as_ref(),
                        o.card.as_ref(),
                    ]
                    .into_iter()
                    .chain(o.joins.iter().map(|j| Some(&j.key))),
                )
            })
            .collect();
        let refund_uses = mapping
            .refunds
            .iter()
            .map(|r| {
                Uses::of(
                    [r.when.as_ref(), Some(&r.order)]
                        .into_iter()
                        .chain(r.joins.iter().map(|j| Some(&j.key))),
                )
            })
            .collect();
        // A catalog's snapshot sends every price row of every product:
        // only the columns the expressions read are handed to CEL.
        let price_uses = mapping
            .prices
            .iter()
            .map(|p| {
                Uses::of(
                    [
                        p.when.as_ref(),
                        Some(&p.product),
                        p.sku.as_ref(),
                        p.currency.as_ref(),
                    ]
                    .into_iter()
                    .chain(p.joins.iter().map(|j| Some(&j.key))),
                )
            })
            .collect();
        let wishlist_uses = mapping
            .wishlists
            .iter()
            .map(|w| {
                Uses::of(
                    [
                        w.when.as_ref(),
                        Some(&w.product),
                        w.identifiers.customer.as_ref(),
                        w.identifiers.email.as_ref(),
                        w.identifiers.phone.as_ref(),
                        w.identifiers.card.as_ref(),
                    ]
                    .into_iter()
                    .chain(w.joins.iter().map(|j| Some(&j.key))),
                )
            })
            .collect();
        // Every line of every order is handed to CEL: only the columns
        // the line expressions read (an Odoo line has 20-odd columns).
        let line_uses = |lines: Option<&Lines>| {
            lines.map_or_else(Uses::all, |l| {
                Uses::of([
                    l.when.as_ref(),
                    Some(&l.sku),
                    l.discounted.as_ref(),
                    l.category.as_ref(),
                ])
            })
        };
        let order_line_uses = mapping
            .orders
            .iter()
            .map(|o| line_uses(o.lines.as_ref()))
            .collect();
        let refund_line_uses = mapping
            .refunds
            .iter()
            .map(|r| line_uses(r.lines.as_ref()))
            .collect();
        Self {
            mapping,
            required: Arc::new(required),
            parked: Arc::default(),
            order_uses: Arc::new(order_uses),
            refund_uses: Arc::new(refund_uses),
            order_line_uses: Arc::new(order_line_uses),
            refund_line_uses: Arc::new(refund_line_uses),
            price_uses: Arc::new(price_uses),
            wishlist_uses: Arc::new(wishlist_uses),
        }
    }

    /// Why rows of `change`'s table cannot be mapped with its current
    /// layout (a DDL dropped or renamed a column the mapping reads), or
    /// `None`. Such a table is parked: its rows go to quarantine with this
    /// reason, the other tables keep streaming.
    fn broken_layout(&self, change: &Change) -> Option<String> {
        let mut missing = Vec::new();
        for (table, columns) in self.required.iter() {
            if !table_matches(table, change) {
                continue;
            }
            for (column, key) in columns {
                if change.table.column_index(column).is_none() {
                    missing.push(format!("`{column}` (read by {key})"));
                }
            }
        }
        if missing.is_empty() {
            return None;
        }
        let reason = format!(
            "table `{}` lost column {}; update the mapping {} (or restore the column), then replay the quarantined rows",
            change.table.name,
            missing.join(", "),
            self.mapping.path.display()
        );
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if parked.insert(change.table.to_string()) {
            tracing::error!(table = %change.table, reason = %reason, "table parked: its rows go to quarantine until the mapping fits");
        }
        Some(reason)
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Normalizes `txn`: updates reference rows through `references` and
    /// returns the events and quarantined rows, in source order.
    pub async fn normalize<R: References>(
        &self,
        txn: &mut SourceTxn,
        references: &mut R,
    ) -> Result<Vec<Outcome>, ConsumerError> {
        let mapping = &*self.mapping;
        let position = txn.position.to_string();
        let origin = |table: &str| Origin {
            source: Arc::clone(&txn.source),
            table: table.to_string(),
            position: position.clone(),
            occurred_at: txn.commit_ts,
            live: txn.kind != crate::source::TxnKind::Snapshot,
        };
        let mut documents: Vec<Change> = Vec::new();
        // (line table, parent key) → line rows, in source order.
        let mut lines: HashMap<(String, String), Vec<Change>> = HashMap::new();
        let mut line_tables: Vec<(&str, &str)> = mapping
            .orders
            .iter()
            .filter_map(|o| o.lines.as_ref())
            .chain(mapping.refunds.iter().filter_map(|r| r.lines.as_ref()))
            .map(|l| (l.table.as_str(), l.parent.as_str()))
            .collect();
        // Orders and refunds may share a lines table (Odoo): hold each once.
        line_tables.sort_unstable();
        line_tables.dedup();
        let mut broken: Vec<(Change, String)> = Vec::new();
        // The changes are taken, not copied: a row goes where the mapping
        // needs it (a reference update is computed on the spot), and is
        // cloned only when two places need it (Odoo's order lines are both
        // lines and reference data).
        let mut reference_updates: Vec<(usize, String, ReferenceUpdate)> = Vec::new();
        let mut layouts: Vec<(Arc<crate::source::Table>, Option<String>)> = Vec::new();
        let changes = std::mem::replace(
            &mut txn.changes,
            crate::source::Changes::from_vec(Vec::new()),
        );
        changes
            .into_each(|change| {
                // Judged once per table layout (every change of one layout
                // shares its `Arc`; holding it keeps the address from being
                // reused by another layout).
                let verdict = match layouts.iter().find(|(t, _)| Arc::ptr_eq(t, &change.table)) {
                    Some((_, verdict)) => verdict.clone(),
                    None => {
                        let verdict = self.broken_layout(&change);
                        layouts.push((Arc::clone(&change.table), verdict.clone()));
                        verdict
                    }
                };
                if let Some(reason) = verdict {
                    broken.push((change, reason));
                    return;
                }
                for (r, reference) in mapping.references.iter().enumerate() {
                    if table_matches(&reference.table, &change) {
                        if let Some((key, update)) = reference_update(reference, &change) {
                            reference_updates.push((r, key, update));
                        }
                    }
                }
                let is_document = mapping
                    .orders
                    .iter()
                    .any(|o| table_matches(&o.table, &change))
                    || mapping
                        .refunds
                        .iter()
                        .any(|r| table_matches(&r.table, &change))
                    || mapping
                        .customers
                        .iter()
                        .any(|c| table_matches(&c.table, &change))
                    || mapping
                        .redemptions
                        .iter()
                        .any(|r| table_matches(&r.table, &change))
                    || mapping
                        .wishlists
                        .iter()
                        .any(|w| table_matches(&w.table, &change))
                    || mapping
                        .prices
                        .iter()
                        .any(|p| table_matches(&p.table, &change));
                for (table, parent) in &line_tables {
                    if !table_matches(table, &change) || change.op == Op::Delete {
                        continue;
                    }
                    if let Some(parent) = change.after_value(parent).and_then(key_text) {
                        let held = lines.entry((table.to_string(), parent)).or_default();
                        if held.len() < MAX_LINES_PER_DOCUMENT {
                            held.push(change.clone());
                        }
                    }
                }
                if is_document {
                    documents.push(change);
                }
            })
            .map_err(|e| {
                ConsumerError::transient(format!("reading the transaction's spilled changes: {e}"))
            })?;

        // Whole rows are written together (one statement for a
        // transaction's order lines); the last image of a key wins.
        let mut puts: Vec<ReferenceRow> = Vec::new();
        let mut put_index: HashMap<(String, String), usize> = HashMap::new();
        for (r, key, update) in reference_updates {
            let reference = &mapping.references[r];
            match update {
                ReferenceUpdate::Field(field, value) => {
                    references
                        .merge(&reference.name, &key, &field, value)
                        .await?;
                }
                ReferenceUpdate::Row(row) => {
                    // A key written twice keeps its place and takes the
                    // later image (an index, not a scan: a snapshot chunk
                    // holds thousands of rows).
                    match put_index.get(&(reference.name.clone(), key.clone())) {
                        Some(&at) => puts[at].2 = row,
                        None => {
                            put_index.insert((reference.name.clone(), key.clone()), puts.len());
                            puts.push((reference.name.clone(), key, row));
                        }
                    }
                }
            }
        }
        if !puts.is_empty() {
            references.put_all(puts).await?;
        }

        let mut outcomes = Vec::new();
        for (change, reason) in broken {
            // A parked header keeps its lines from the same transaction (when
            // its key column is still there): replayed alone it would have
            // none.
            let doc = mapping
                .orders
                .iter()
                .map(|o| (&o.table, &o.key, o.lines.as_ref()))
                .chain(
                    mapping
                        .refunds
                        .iter()
                        .map(|r| (&r.table, &r.key, r.lines.as_ref())),
                )
                .filter(|(table, _, _)| table_matches(table, &change))
                .map(|(_, key, line_mapping)| Document::new(&change, key, line_mapping, &lines))
                .find(|doc| !doc.lines.is_empty())
                .unwrap_or(Document {
                    change: &change,
                    key: None,
                    lines: &[],
                });
            outcomes.push(quarantined(&doc, &origin(&change.table.name), reason));
        }
        for change in &documents {
            if change.op == Op::Delete {
                // A wishlist item deleted: off the wishlist (the key is in
                // every before-image, the primary key's at least).
                for wishlist in mapping
                    .wishlists
                    .iter()
                    .filter(|w| table_matches(&w.table, change))
                {
                    if let Some(item_ref) = change.before_value(&wishlist.key).and_then(key_text) {
                        outcomes.push(Outcome::Event(
                            MemberEvent::Wishlist(WishlistEvent {
                                item_ref,
                                change: WishlistChange::Removed,
                            }),
                            origin(&wishlist.table),
                        ));
                    }
                }
            }
            if matches!(change.op, Op::Delete | Op::Truncate) {
                continue;
            }
            for (order_index, order) in mapping
                .orders
                .iter()
                .enumerate()
                .filter(|(_, o)| table_matches(&o.table, change))
            {
                let doc = Document::new(change, &order.key, order.lines.as_ref(), &lines);
                let outcome = self
                    .order(
                        order,
                        order_index,
                        &doc,
                        txn,
                        references,
                        origin(&order.table),
                    )
                    .await?;
                outcomes.extend(outcome);
            }
            for (refund_index, refund) in mapping
                .refunds
                .iter()
                .enumerate()
                .filter(|(_, r)| table_matches(&r.table, change))
            {
                let doc = Document::new(change, &refund.key, refund.lines.as_ref(), &lines);
                let outcome = self
                    .refund(
                        refund,
                        refund_index,
                        &doc,
                        references,
                        origin(&refund.table),
                    )
                    .await?;
                outcomes.extend(outcome);
            }
            for customer in mapping
                .customers
                .iter()
                .filter(|c| table_matches(&c.table, change))
            {
                let doc = Document::new(change, &customer.key, None, &lines);
                let outcome = self
                    .customer(customer, &doc, references, origin(&customer.table))
                    .await?;
                outcomes.extend(outcome);
            }
            for redemption in mapping
                .redemptions
                .iter()
                .filter(|r| table_matches(&r.table, change))
            {
                let doc = Document::new(change, &redemption.key, None, &lines);
                let outcome = self
                    .redemption(redemption, &doc, references, origin(&redemption.table))
                    .await?;
                outcomes.extend(outcome);
            }
            for (index, wishlist) in mapping
                .wishlists
                .iter()
                .enumerate()
                .filter(|(_, w)| table_matches(&w.table, change))
            {
                let doc = Document::new(change, &wishlist.key, None, &lines);
                let uses = &self.wishlist_uses[index];
                let outcome = self
                    .wishlist(wishlist, uses, &doc, references, origin(&wishlist.table))
                    .await?;
                outcomes.extend(outcome);
            }
            for (index, price) in mapping
                .prices
                .iter()
                .enumerate()
                .filter(|(_, p)| table_matches(&p.table, change))
            {
                let doc = Document::new(change, &price.key, None, &lines);
                let uses = &self.price_uses[index];
                let outcome = self
                    .price(price, uses, &doc, references, origin(&price.table))
                    .await?;
                outcomes.extend(outcome);
            }
        }
        Ok(outcomes)
    }

    async fn wishlist<R: References>(
        &self,
        wishlist: &mapping::WishlistMapping,
        uses: &Uses,
        doc: &Document<'_>,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (item_ref, scope, _joined) = match self
            .prepare(
                doc,
                &wishlist.key,
                uses,
                &wishlist.joins,
                wishlist.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let product = match required_text(&wishlist.product, &scope, "product") {
            Ok(product) => product,
            Err(reason) => return Ok(quarantine(reason)),
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Wishlist(WishlistEvent {
                item_ref,
                change: WishlistChange::Added {
                    product,
                    identifiers: raw_identifiers(&wishlist.identifiers, &scope),
                },
            }),
            origin,
        )))
    }

    async fn price<R: References>(
        &self,
        price: &mapping::PriceMapping,
        uses: &Uses,
        doc: &Document<'_>,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (_key, scope, joined) = match self
            .prepare(
                doc,
                &price.key,
                uses,
                &price.joins,
                price.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let product = match required_text(&price.product, &scope, "product") {
            Ok(product) => product,
            Err(reason) => return Ok(quarantine(reason)),
        };
        let amount = match price.price.sum(|t| term_value(doc, &joined, t)) {
            Ok(amount) if amount >= Decimal::ZERO => amount,
            Ok(amount) => return Ok(quarantine(format!("price {amount} is negative"))),
            Err(reason) => return Ok(quarantine(reason)),
        };
        // Like identifiers, what only words a message is optional.
        let text = |expr: &Option<expr::Expr>| {
            expr.as_ref()
                .and_then(|e| e.text_value(&scope).ok().flatten())
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Price(PriceEvent {
                product,
                price: amount,
                sku: text(&price.sku),
                currency: text(&price.currency),
            }),
            origin,
        )))
    }

    async fn customer<R: References>(
        &self,
        customer: &mapping::CustomerMapping,
        doc: &Document<'_>,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (customer_ref, scope, _joined) = match self
            .prepare(
                doc,
                &customer.key,
                &Uses::all(),
                &customer.joins,
                customer.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let flag = |expr: &Option<expr::Expr>| -> Result<Option<bool>, String> {
            expr.as_ref()
                .map(|e| e.bool_value(&scope).map_err(|e| e.to_string()))
                .transpose()
                .map(Option::flatten)
        };
        let profile = (|| {
            Ok::<_, String>(Profile {
                email_opt_in: flag(&customer.email_opt_in)?,
                sms_opt_in: flag(&customer.sms_opt_in)?,
                push_opt_in: flag(&customer.push_opt_in)?,
                timezone: customer
                    .timezone
                    .as_ref()
                    .and_then(|e| e.text_value(&scope).ok().flatten()),
                locale: customer
                    .locale
                    .as_ref()
                    .and_then(|e| e.text_value(&scope).ok().flatten()),
                push_token: customer
                    .push_token
                    .as_ref()
                    .and_then(|e| e.text_value(&scope).ok().flatten()),
                line_user_id: customer
                    .line_user_id
                    .as_ref()
                    .and_then(|e| e.text_value(&scope).ok().flatten()),
                profiling_opt_out: flag(&customer.profiling_opt_out)?,
            })
        })();
        let profile = match profile {
            Ok(profile) => profile,
            Err(reason) => return Ok(quarantine(reason)),
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Customer(CustomerEvent {
                customer_ref,
                identifiers: raw_identifiers(&customer.identifiers, &scope),
                profile,
            }),
            origin,
        )))
    }

    async fn redemption<R: References>(
        &self,
        redemption: &mapping::RedemptionMapping,
        doc: &Document<'_>,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (redemption_ref, scope, joined) = match self
            .prepare(
                doc,
                &redemption.key,
                &Uses::all(),
                &redemption.joins,
                redemption.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let points = match redemption.points.sum(|t| term_value(doc, &joined, t)) {
            Ok(points) => points.abs().floor(),
            Err(reason) => return Ok(quarantine(reason)),
        };
        use rust_decimal::prelude::ToPrimitive;
        let Some(points) = points.to_i64() else {
            return Ok(quarantine(format!("{points} points is out of range")));
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Redemption(RedemptionEvent {
                redemption_ref,
                points,
                identifiers: raw_identifiers(&redemption.identifiers, &scope),
            }),
            origin,
        )))
    }

    async fn order<R: References>(
        &self,
        order: &mapping::OrderMapping,
        order_index: usize,
        doc: &Document<'_>,
        txn: &SourceTxn,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (order_ref, scope, joined) = match self
            .prepare(
                doc,
                &order.key,
                &self.order_uses[order_index],
                &order.joins,
                order.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let status = match order.status.text_value(&scope) {
            Ok(Some(status)) => status,
            Ok(None) => {
                return Ok(quarantine(format!(
                    "NULL status (`{}`)",
                    order.status.text()
                )))
            }
            Err(error) => return Ok(quarantine(error.to_string())),
        };
        let stage = match order.statuses.iter().find(|(s, _)| *s == status) {
            Some((_, StatusMeaning::Placed)) => OrderStage::Placed,
            Some((_, StatusMeaning::Completed)) => OrderStage::Completed,
            Some((_, StatusMeaning::Cancelled)) => OrderStage::Cancelled,
            Some((_, StatusMeaning::Refunded)) => OrderStage::Refunded,
            Some((_, StatusMeaning::Ignored)) => return Ok(None),
            None => {
                return Ok(quarantine(format!(
                    "unknown status `{status}`; list it under placed, completed, cancelled, refunded or ignored in {}",
                    self.mapping.path.display()
                )))
            }
        };
        let earn_basis = match order.earn_basis.sum(|t| term_value(doc, &joined, t)) {
            Ok(amount) => amount,
            Err(reason) => return Ok(quarantine(reason)),
        };
        let grand_total = match order.grand_total.sum(|t| term_value(doc, &joined, t)) {
            Ok(amount) => amount,
            Err(reason) => return Ok(quarantine(reason)),
        };
        let line_uses = &self.order_line_uses[order_index];
        let lines = match order
            .lines
            .as_ref()
            .map(|l| doc.lines(l, line_uses))
            .transpose()
        {
            Ok(lines) => lines.unwrap_or_default(),
            Err(reason) => return Ok(quarantine(reason)),
        };
        if order.lines.as_ref().is_some_and(|l| l.required)
            && lines.is_empty()
            && doc.change.op == Op::Insert
            && matches!(txn.kind, TxnKind::Stream { .. })
        {
            return Ok(quarantine("an order with no lines".into()));
        }
        // Identifiers are optional by nature: one that cannot be read is
        // absent, and an order without any is anonymous (counted, no points).
        let text = |expr: &Option<expr::Expr>| {
            expr.as_ref()
                .and_then(|e| e.text_value(&scope).ok().flatten())
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Order(OrderEvent {
                order_ref,
                stage,
                earn_basis,
                grand_total,
                currency: text(&order.currency),
                channel: text(&order.channel),
                identifiers: RawIdentifiers {
                    customer: text(&order.customer),
                    email: text(&order.email),
                    phone: text(&order.phone),
                    card: text(&order.card),
                },
                lines,
            }),
            origin,
        )))
    }

    async fn refund<R: References>(
        &self,
        refund: &mapping::RefundMapping,
        refund_index: usize,
        doc: &Document<'_>,
        references: &mut R,
        origin: Origin,
    ) -> Result<Option<Outcome>, ConsumerError> {
        let quarantine = |reason: String| Some(quarantined(doc, &origin, reason));
        let (refund_ref, scope, joined) = match self
            .prepare(
                doc,
                &refund.key,
                &self.refund_uses[refund_index],
                &refund.joins,
                refund.when.as_ref(),
                references,
            )
            .await?
        {
            Prepared::Ready(key, scope, joined) => (key, scope, joined),
            Prepared::Skip => return Ok(None),
            Prepared::Quarantine(reason) => return Ok(quarantine(reason)),
        };
        let order_ref = match refund.order.text_value(&scope) {
            Ok(Some(order_ref)) => order_ref,
            Ok(None) => {
                return Ok(quarantine(format!(
                    "the refunded order is unknown (`{}` is null)",
                    refund.order.text()
                )))
            }
            Err(error) => return Ok(quarantine(error.to_string())),
        };
        let amount = match refund.amount.sum(|t| term_value(doc, &joined, t)) {
            Ok(amount) => amount.abs(),
            Err(reason) => return Ok(quarantine(reason)),
        };
        let line_uses = &self.refund_line_uses[refund_index];
        let lines = match refund
            .lines
            .as_ref()
            .map(|l| doc.lines(l, line_uses))
            .transpose()
        {
            Ok(lines) => lines.unwrap_or_default(),
            Err(reason) => return Ok(quarantine(reason)),
        };
        Ok(Some(Outcome::Event(
            MemberEvent::Refund(RefundEvent {
                refund_ref,
                order_ref,
                amount,
                of_grand_total: refund.of_grand_total,
                lines,
            }),
            origin,
        )))
    }

    /// The common start of every document: its key, its variables, its
    /// joins and its `when`. `when` is tested before the joins unless it
    /// reads one, so rows a mapping skips cost no lookups.
    async fn prepare<R: References>(
        &self,
        doc: &Document<'_>,
        key_column: &str,
        uses: &Uses,
        joins: &[mapping::Join],
        when: Option<&expr::Expr>,
        references: &mut R,
    ) -> Result<Prepared, ConsumerError> {
        let Some(key) = doc.key.clone() else {
            return Ok(Prepared::Quarantine(format!(
                "NULL key column `{key_column}`"
            )));
        };
        // `lines` (every line's whole row) is handed over once the
        // condition passes, unless the condition reads it: a refund mapping
        // reads the lines, and every order is first tested against it.
        let when_reads_lines = when.is_some_and(|w| w.text().contains("lines"));
        let mut scope = doc.scope(uses, when_reads_lines);
        let reads_joins =
            when.is_some_and(|w| joins.iter().any(|j| w.text().contains(j.name.as_str())));
        let test = |scope: &Scope| match when.map(|w| w.test(scope)) {
            None | Some(Ok(true)) => None,
            Some(Ok(false)) => Some(Prepared::Skip),
            Some(Err(error)) => Some(Prepared::Quarantine(error.to_string())),
        };
        if !reads_joins {
            if let Some(verdict) = test(&scope) {
                return Ok(verdict);
            }
        }
        if uses.lines && !when_reads_lines {
            doc.set_lines(&mut scope);
        }
        let joined = match self.join(joins, &mut scope, references).await? {
            Ok(joined) => joined,
            Err(error) => return Ok(Prepared::Quarantine(error)),
        };
        if reads_joins {
            if let Some(verdict) = test(&scope) {
                return Ok(verdict);
            }
        }
        Ok(Prepared::Ready(key, scope, joined))
    }

    /// Looks up each join in order; a key that cannot be computed is a
    /// mapping problem for this row (`Ok(Err(reason))`), an unknown key a
    /// row of nulls.
    async fn join<R: References>(
        &self,
        joins: &[mapping::Join],
        scope: &mut Scope,
        references: &mut R,
    ) -> Result<Result<Joined, String>, ConsumerError> {
        let mut joined = Joined::new();
        for join in joins {
            let reference = &self.mapping.references[join.reference];
            let key = match join.key.text_value(scope) {
                Ok(key) => key,
                Err(error) => return Ok(Err(error.to_string())),
            };
            let row = match key {
                Some(key) => references.get(&reference.name, &key).await?,
                None => None,
            };
            scope.set_val(&join.name, json_val(&reference.columns, row.as_ref()));
            joined.insert(join.name.clone(), row);
        }
        Ok(Ok(joined))
    }
}

/// A text field the document cannot do without: NULL or an error is the
/// reason to quarantine it.
fn required_text(expr: &expr::Expr, scope: &Scope, key: &str) -> Result<String, String> {
    match expr.text_value(scope) {
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(format!("`{key}` ({}) is NULL", expr.text())),
        Err(error) => Err(error.to_string()),
    }
}

/// How a document row starts: skipped (its `when` is false), quarantined
/// (no key, a join or `when` that cannot be evaluated), or ready with its
/// key, its variables and its joined rows.
enum Prepared {
    Skip,
    Quarantine(String),
    Ready(String, Scope, Joined),
}

fn quarantined(doc: &Document<'_>, origin: &Origin, reason: String) -> Outcome {
    Outcome::Quarantine(Quarantined {
        origin: origin.clone(),
        op: doc.change.op,
        reason,
        row: doc.json(),
        replay: replay::Replay::Changes(replay::StoredChanges::of(
            std::iter::once(doc.change).chain(doc.lines),
        )),
    })
}

/// One order or refund row and its lines.
struct Document<'a> {
    change: &'a Change,
    key: Option<String>,
    lines: &'a [Change],
}

impl<'a> Document<'a> {
    fn new(
        change: &'a Change,
        key_column: &str,
        lines: Option<&Lines>,
        held: &'a HashMap<(String, String), Vec<Change>>,
    ) -> Self {
        let key = change.after_value(key_column).and_then(key_text);
        let lines = match (lines, &key) {
            (Some(lines), Some(key)) => held
                .get(&(lines.table.clone(), key.clone()))
                .map_or(&[][..], Vec::as_slice),
            _ => &[],
        };
        Self { change, key, lines }
    }

    fn value(&self, column: &str) -> Option<&Value> {
        self.change.after_value(column)
    }

    /// `with_lines`: hand over `lines` now if the expressions read it
    /// (else [`Document::set_lines`] does it later).
    fn scope(&self, uses: &Uses, with_lines: bool) -> Scope {
        let mut scope = Scope::default();
        let table = &self.change.table;
        match &self.change.after {
            Some(r) => scope.set_val(
                "row",
                row_val(&table.columns, &r.0, uses.columns.as_deref()),
            ),
            None => scope.set("row", cel::Value::Null),
        }
        if uses.before {
            match &self.change.before {
                Some(r) => scope.set_val(
                    "before",
                    row_val(&table.columns, &r.0, uses.columns.as_deref()),
                ),
                None => scope.set("before", cel::Value::Null),
            }
        }
        if uses.lines && with_lines {
            self.set_lines(&mut scope);
        }
        scope
    }

    fn set_lines(&self, scope: &mut Scope) {
        let line_rows = self
            .lines
            .iter()
            .filter_map(|l| l.after.as_ref().map(|r| row_map(&l.table.columns, &r.0)))
            .collect();
        scope.set("lines", list(line_rows));
    }

    /// The counted lines. Their expressions see the line as `row`.
    fn lines(&self, mapping: &Lines, uses: &Uses) -> Result<Vec<Line>, String> {
        let mut counted = Vec::new();
        for line in self.lines {
            let Some(after) = &line.after else { continue };
            let mut scope = Scope::default();
            scope.set_val(
                "row",
                row_val(&line.table.columns, &after.0, uses.columns.as_deref()),
            );
            if let Some(when) = &mapping.when {
                if !when.test(&scope).map_err(|e| e.to_string())? {
                    continue;
                }
            }
            let value = |column: &str| line.after_value(column);
            let quantity = match amount_value(value(&mapping.quantity)) {
                Some(AmountValue::Number(q)) => q,
                _ => {
                    return Err(format!(
                        "line quantity in column `{}` is NULL or unparsable",
                        mapping.quantity
                    ))
                }
            };
            // Like identifiers, what only personalizes (a discount flag, a
            // category) never quarantines a line: unreadable is absent.
            let discounted = mapping
                .discounted
                .as_ref()
                .and_then(|e| e.bool_value(&scope).ok().flatten())
                .unwrap_or(false);
            let category = mapping
                .category
                .as_ref()
                .and_then(|e| e.text_value(&scope).ok().flatten());
            counted.push(Line {
                discounted,
                category,
                sku: mapping.sku.text_value(&scope).map_err(|e| e.to_string())?,
                quantity,
                amount: mapping.amount.sum(|t| {
                    t.join
                        .is_none()
                        .then(|| amount_value(value(&t.column)))
                        .flatten()
                })?,
            });
        }
        Ok(counted)
    }

    fn json(&self) -> serde_json::Value {
        let table = &self.change.table;
        let image = self.change.after.as_ref().or(self.change.before.as_ref());
        let map: serde_json::Map<String, serde_json::Value> = image
            .map(|row| {
                table
                    .columns
                    .iter()
                    .zip(&row.0)
                    .map(|(c, v)| (c.name.clone(), plain_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        serde_json::Value::Object(map)
    }
}

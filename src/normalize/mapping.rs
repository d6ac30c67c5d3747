//! The mapping file format (`connectors/sources/*.toml`): which tables of a
//! source schema carry orders, refunds and reference data, and how their
//! columns become member events. The doc comments below are the operator's
//! reference; README.md shows a whole file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use serde::Deserialize;

use super::expr::Expr;
use crate::config::ConfigProblem;
use crate::source::SourceKind;

/// A mapping file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// The system this maps, for people (`Magento 2.4`).
    pub system: String,
    /// The source kind it is written for (`postgres` or `mysql`).
    pub kind: SourceKind,
    /// Reference data kept current from the change stream (and the
    /// snapshot), looked up by key from orders and refunds.
    #[serde(default)]
    pub references: Vec<ReferenceFile>,
    /// Tables whose rows are orders.
    #[serde(default)]
    pub orders: Vec<OrderFile>,
    /// Tables whose rows are refunds of an order.
    #[serde(default)]
    pub refunds: Vec<RefundFile>,
    /// Tables whose rows are customers: enrollment, profile and consent.
    #[serde(default)]
    pub customers: Vec<CustomerFile>,
    /// Tables whose rows redeem points.
    #[serde(default)]
    pub redemptions: Vec<RedemptionFile>,
    /// Tables whose rows put a product on a customer's wishlist.
    #[serde(default)]
    pub wishlists: Vec<WishlistFile>,
    /// Tables whose rows state a product's price.
    #[serde(default)]
    pub prices: Vec<PriceFile>,
}

/// `[[wishlists]]`: a row that puts a product on a customer's wishlist; a
/// delete at the source (Magento deletes the item when it goes to the cart)
/// takes it off. The product must be named as `[[prices]]` names it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WishlistFile {
    pub table: String,
    /// Key column: the item's reference.
    pub key: String,
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the product (Magento: `string(row.product_id)`).
    pub product: String,
    #[serde(default)]
    pub customer: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub card: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
}

/// `[[prices]]`: a row that states what a product costs now. A price below
/// what a member waiting for the product last saw fires `price_drop`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    pub table: String,
    /// Key column of the row.
    pub key: String,
    /// CEL: rows that are prices (Magento: the `price` attribute, default
    /// scope).
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the product, as `[[wishlists]]` names it.
    pub product: String,
    /// Columns summed exactly: the price.
    pub price: Vec<String>,
    /// CEL: the product's SKU, for messages.
    #[serde(default)]
    pub sku: Option<String>,
    /// CEL: the price's currency, for messages.
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
}

/// `[[customers]]`: a customer account or contact. A new one enrolls a
/// member; changes update the member's profile and consent. Every field
/// but `table` and `key` is optional; a field left out leaves what the
/// ledger knows unchanged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerFile {
    pub table: String,
    pub key: String,
    /// CEL: rows that are customers (Odoo: contacts, not companies).
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the source's own customer id (the same id orders carry).
    #[serde(default)]
    pub customer: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub card: Option<String>,
    /// CEL, bool: consent to marketing email / SMS / push.
    #[serde(default)]
    pub email_opt_in: Option<String>,
    #[serde(default)]
    pub sms_opt_in: Option<String>,
    #[serde(default)]
    pub push_opt_in: Option<String>,
    /// CEL, text: IANA time zone (`Europe/Berlin`), for quiet hours.
    #[serde(default)]
    pub timezone: Option<String>,
    /// CEL, text: language or locale (`de_DE`).
    #[serde(default)]
    pub locale: Option<String>,
    /// CEL, text: device registration token for push messages.
    #[serde(default)]
    pub push_token: Option<String>,
    /// CEL, text: LINE user id for LINE messages.
    #[serde(default)]
    pub line_user_id: Option<String>,
    /// CEL, bool: the customer objected to profiling (true: no scores, no
    /// segments, only offers for everyone).
    #[serde(default)]
    pub profiling_opt_out: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
}

/// `[[redemptions]]`: a row that spends points.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedemptionFile {
    pub table: String,
    /// Key column: the redemption's reference (booked once).
    pub key: String,
    #[serde(default)]
    pub when: Option<String>,
    /// Columns summed exactly: the points spent (fractions are dropped).
    pub points: Vec<String>,
    #[serde(default)]
    pub customer: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub card: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
}

/// `[[references]]`: a table kept as `key → columns`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceFile {
    /// Name joins use (`store`).
    pub name: String,
    /// Table (`store`; PostgreSQL may say `schema.table`).
    pub table: String,
    /// Key column.
    pub key: String,
    /// Columns kept (only these are stored). With `pivot`: the meta keys
    /// kept.
    pub columns: Vec<String>,
    /// A key/value ("meta") table: each row is one field of the entity
    /// named by `key` (WooCommerce `wp_usermeta`: `user_id`, `meta_key`,
    /// `meta_value`). The fields listed in `columns` are gathered into one
    /// row per key.
    #[serde(default)]
    pub pivot: Option<PivotFile>,
}

/// `pivot = { name = "meta_key", value = "meta_value" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PivotFile {
    /// Column holding the field's name.
    pub name: String,
    /// Column holding its value.
    pub value: String,
}

/// `[[orders.joins]]`: a reference row looked up for each document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinFile {
    /// Variable name the joined row gets in expressions.
    pub name: String,
    /// Which `[[references]]` to look in.
    pub reference: String,
    /// CEL: the key (`row.store_id`); may use earlier joins and `lines`.
    pub key: String,
}

/// `[orders.lines]`: child rows of a document in the same source
/// transaction (order lines, refund lines).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinesFile {
    pub table: String,
    /// Column holding the document's key.
    pub parent: String,
    /// CEL over `row`: which lines count (Magento: `row.parent_item_id ==
    /// null`, so a configurable product counts once).
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the line's SKU.
    pub sku: String,
    /// Column: quantity (exact).
    pub quantity: String,
    /// Columns summed exactly: the line's amount.
    pub amount: Vec<String>,
    /// Quarantine a new document that arrives without any counted line.
    #[serde(default)]
    pub required: bool,
    /// CEL over `row`: the line was sold at a discount (price
    /// sensitivity: the share of spend on discounted lines).
    #[serde(default)]
    pub discounted: Option<String>,
    /// CEL over `row`: the line's brand or category (brand and category
    /// enthusiasm); none: the product itself.
    #[serde(default)]
    pub category: Option<String>,
}

/// `[[orders]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderFile {
    pub table: String,
    /// Key column: the order's reference in this source.
    pub key: String,
    /// CEL: rows that are orders of this mapping at all; others are skipped
    /// (Odoo refunds live in the same table).
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the order's status as text.
    pub status: String,
    /// Statuses meaning placed, not yet complete: points pending.
    #[serde(default)]
    pub placed: Vec<String>,
    /// Statuses meaning complete (paid at the till, shipped): available.
    #[serde(default)]
    pub completed: Vec<String>,
    /// Statuses meaning cancelled: pending points void.
    #[serde(default)]
    pub cancelled: Vec<String>,
    /// Statuses meaning fully refunded: everything earned clawed back.
    #[serde(default)]
    pub refunded: Vec<String>,
    /// Statuses that mean nothing yet (drafts, unpaid carts): no event.
    #[serde(default)]
    pub ignored: Vec<String>,
    /// Columns summed exactly into the earn basis (goods after discount,
    /// without tax, shipping and tips). `-col` subtracts; `col?` reads NULL
    /// as 0 (otherwise NULL quarantines the row).
    pub earn_basis: Vec<String>,
    /// Columns summed into the grand total (for programs that earn on it).
    pub grand_total: Vec<String>,
    /// CEL: currency code.
    #[serde(default)]
    pub currency: Option<String>,
    /// CEL: sales channel (`'pos:' + config.name`).
    #[serde(default)]
    pub channel: Option<String>,
    /// CEL: the source's own customer id (null for guests).
    #[serde(default)]
    pub customer: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    /// CEL: loyalty card number.
    #[serde(default)]
    pub card: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
    #[serde(default)]
    pub lines: Option<LinesFile>,
}

/// `[[refunds]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundFile {
    pub table: String,
    /// Key column: the refund's own reference.
    pub key: String,
    /// CEL: rows that are booked refunds (Magento: `row.state == 2`).
    #[serde(default)]
    pub when: Option<String>,
    /// CEL: the refunded order's key (as the order mapping's `key`).
    pub order: String,
    /// Columns summed exactly: the refunded amount (the sign is ignored:
    /// refunds written negative count the same).
    pub amount: Vec<String>,
    /// What `amount` is a part of: `earn_basis` (default: the refund is on
    /// the same footing as the order's earn basis) or `grand_total` (a
    /// refund of gross money, as Saleor grants them). Points are clawed back
    /// in that proportion.
    #[serde(default)]
    pub proportion_of: Option<String>,
    #[serde(default)]
    pub joins: Vec<JoinFile>,
    #[serde(default)]
    pub lines: Option<LinesFile>,
}

/// One column of an exact sum: the document's own (`col`) or a joined
/// row's (`join.col`).
#[derive(Debug, Clone)]
pub struct Term {
    pub join: Option<String>,
    pub column: String,
    pub negative: bool,
    pub null_is_zero: bool,
}

/// An exact sum of columns.
#[derive(Debug, Clone)]
pub struct Amount(pub Vec<Term>);

impl Amount {
    fn parse(terms: &[String]) -> Result<Self, String> {
        if terms.is_empty() {
            return Err("name at least one column".into());
        }
        let name_ok =
            |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        terms
            .iter()
            .map(|term| {
                let (negative, rest) = match term.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, term.as_str()),
                };
                let (null_is_zero, column) = match rest.strip_suffix('?') {
                    Some(column) => (true, column),
                    None => (false, rest),
                };
                let (join, column) = match column.split_once('.') {
                    Some((join, column)) => (Some(join.to_string()), column),
                    None => (None, column),
                };
                if !name_ok(column) || !join.as_deref().is_none_or(name_ok) {
                    return Err(format!(
                        "`{term}` is not a column (write `col` or `join.col`, with `-` in front to subtract and `?` after to read NULL as 0)"
                    ));
                }
                Ok(Term {
                    join,
                    column: column.to_string(),
                    negative,
                    null_is_zero,
                })
            })
            .collect::<Result<_, _>>()
            .map(Amount)
    }

    /// The document's own columns (joined ones belong to their reference).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(|t| t.join.is_none())
            .map(|t| t.column.as_str())
    }

    /// The exact sum over `value(term)`; `Err` names the column and why.
    pub fn sum(
        &self,
        mut value: impl FnMut(&Term) -> Option<AmountValue>,
    ) -> Result<Decimal, String> {
        let mut total = Decimal::ZERO;
        for term in &self.0 {
            let column = match &term.join {
                Some(join) => format!("{join}.{}", term.column),
                None => term.column.clone(),
            };
            let amount = match value(term) {
                Some(AmountValue::Number(n)) => n,
                Some(AmountValue::Null) | None if term.null_is_zero => Decimal::ZERO,
                Some(AmountValue::Null) | None => {
                    return Err(format!("NULL amount in column `{column}`"))
                }
                Some(AmountValue::Unparsable) => {
                    return Err(format!("unparsable amount in column `{column}`"))
                }
            };
            total = if term.negative {
                total - amount
            } else {
                total + amount
            };
        }
        Ok(total)
    }
}

/// A column value as an amount.
pub enum AmountValue {
    Number(Decimal),
    Null,
    Unparsable,
}

/// A join, compiled.
#[derive(Debug)]
pub struct Join {
    pub name: String,
    pub reference: usize,
    pub key: Expr,
}

/// Lines, compiled.
#[derive(Debug)]
pub struct Lines {
    pub table: String,
    pub parent: String,
    pub when: Option<Expr>,
    pub sku: Expr,
    pub quantity: String,
    pub amount: Amount,
    pub required: bool,
    pub discounted: Option<Expr>,
    pub category: Option<Expr>,
}

/// A reference table, compiled.
#[derive(Debug)]
pub struct Reference {
    pub name: String,
    pub table: String,
    pub key: String,
    pub columns: Vec<String>,
    /// Key/value table: (name column, value column).
    pub pivot: Option<(String, String)>,
}

/// What an order's status means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMeaning {
    Placed,
    Completed,
    Cancelled,
    Refunded,
    Ignored,
}

/// An order mapping, compiled.
#[derive(Debug)]
pub struct OrderMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub status: Expr,
    pub statuses: Vec<(String, StatusMeaning)>,
    pub earn_basis: Amount,
    pub grand_total: Amount,
    pub currency: Option<Expr>,
    pub channel: Option<Expr>,
    pub customer: Option<Expr>,
    pub email: Option<Expr>,
    pub phone: Option<Expr>,
    pub card: Option<Expr>,
    pub joins: Vec<Join>,
    pub lines: Option<Lines>,
}

/// A refund mapping, compiled.
#[derive(Debug)]
pub struct RefundMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub order: Expr,
    pub amount: Amount,
    /// The refund is a part of the order's grand total, not its earn basis.
    pub of_grand_total: bool,
    pub joins: Vec<Join>,
    pub lines: Option<Lines>,
}

/// Identifier expressions of a document.
#[derive(Debug, Default)]
pub struct IdentifierExprs {
    pub customer: Option<Expr>,
    pub email: Option<Expr>,
    pub phone: Option<Expr>,
    pub card: Option<Expr>,
}

impl IdentifierExprs {
    fn named(&self) -> [(&'static str, Option<&Expr>); 4] {
        [
            ("customer", self.customer.as_ref()),
            ("email", self.email.as_ref()),
            ("phone", self.phone.as_ref()),
            ("card", self.card.as_ref()),
        ]
    }
}

/// A customer mapping, compiled.
#[derive(Debug)]
pub struct CustomerMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub identifiers: IdentifierExprs,
    pub email_opt_in: Option<Expr>,
    pub sms_opt_in: Option<Expr>,
    pub push_opt_in: Option<Expr>,
    pub timezone: Option<Expr>,
    pub locale: Option<Expr>,
    pub push_token: Option<Expr>,
    pub line_user_id: Option<Expr>,
    pub profiling_opt_out: Option<Expr>,
    pub joins: Vec<Join>,
}

/// A redemption mapping, compiled.
#[derive(Debug)]
pub struct RedemptionMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub points: Amount,
    pub identifiers: IdentifierExprs,
    pub joins: Vec<Join>,
}

/// A wishlist mapping, compiled.
#[derive(Debug)]
pub struct WishlistMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub product: Expr,
    pub identifiers: IdentifierExprs,
    pub joins: Vec<Join>,
}

/// A price mapping, compiled.
#[derive(Debug)]
pub struct PriceMapping {
    pub table: String,
    pub key: String,
    pub when: Option<Expr>,
    pub product: Expr,
    pub price: Amount,
    pub sku: Option<Expr>,
    pub currency: Option<Expr>,
    pub joins: Vec<Join>,
}

/// A mapping file, loaded and compiled: every expression parsed, every
/// join resolved.
#[derive(Debug)]
pub struct Mapping {
    pub path: PathBuf,
    pub system: String,
    pub kind: SourceKind,
    pub references: Vec<Reference>,
    pub orders: Vec<OrderMapping>,
    pub refunds: Vec<RefundMapping>,
    pub customers: Vec<CustomerMapping>,
    pub redemptions: Vec<RedemptionMapping>,
    pub wishlists: Vec<WishlistMapping>,
    pub prices: Vec<PriceMapping>,
}

impl Mapping {
    /// Reads and compiles `path`; every problem is reported with the file,
    /// the key and what to do.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigProblem>> {
        let origin = path.display().to_string();
        let problem = |key: &str, message: String| ConfigProblem {
            origin: origin.clone(),
            key: key.to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![problem(
                "",
                format!(
                    "cannot read the mapping file: {e}; check the `mapping` path of the source"
                ),
            )]
        })?;
        let file: MappingFile = toml::from_str(&text).map_err(|e| {
            let key = e
                .span()
                .map(|span| format!("line {}", text[..span.start].lines().count().max(1)))
                .unwrap_or_default();
            vec![problem(&key, e.message().to_string())]
        })?;
        let mut problems = Vec::new();
        let mapping = compile(path, file, &mut |key, message| {
            problems.push(problem(&key, message))
        });
        if problems.is_empty() {
            Ok(mapping)
        } else {
            Err(problems)
        }
    }

    /// Every table this mapping reads, references first (so a snapshot
    /// copies the reference data before the orders that look it up).
    pub fn tables(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut tables = Vec::new();
        let documents = self
            .orders
            .iter()
            .map(|o| (&o.table, o.lines.as_ref()))
            .chain(self.refunds.iter().map(|r| (&r.table, r.lines.as_ref())));
        let all =
            self.references
                .iter()
                .map(|r| &r.table)
                .chain(self.customers.iter().map(|c| &c.table))
                .chain(documents.flat_map(|(table, lines)| {
                    std::iter::once(table).chain(lines.map(|l| &l.table))
                }))
                .chain(self.redemptions.iter().map(|r| &r.table))
                .chain(self.wishlists.iter().map(|w| &w.table))
                .chain(self.prices.iter().map(|p| &p.table));
        for table in all {
            if seen.insert(table.clone()) {
                tables.push(table.clone());
            }
        }
        tables
    }

    /// The columns each table must have: `(table, column, where it is named)`.
    pub fn required_columns(&self) -> Vec<(String, String, String)> {
        let mut needs = Vec::new();
        for (i, reference) in self.references.iter().enumerate() {
            needs.push((
                reference.table.clone(),
                reference.key.clone(),
                format!("references[{i}].key"),
            ));
            if let Some((name, value)) = &reference.pivot {
                needs.push((
                    reference.table.clone(),
                    name.clone(),
                    format!("references[{i}].pivot.name"),
                ));
                needs.push((
                    reference.table.clone(),
                    value.clone(),
                    format!("references[{i}].pivot.value"),
                ));
                continue;
            }
            for column in &reference.columns {
                needs.push((
                    reference.table.clone(),
                    column.clone(),
                    format!("references[{i}].columns"),
                ));
            }
        }
        // What every document kind reads: its key, the columns of its
        // amounts, and the columns its expressions and joins read.
        let document = |needs: &mut Vec<(String, String, String)>,
                        table: &str,
                        key_column: &str,
                        key: &str,
                        amounts: &[(&str, &Amount)],
                        exprs: &[(&str, Option<&Expr>)],
                        joins: &[Join]| {
            needs.push((
                table.to_string(),
                key_column.to_string(),
                format!("{key}.key"),
            ));
            for (name, amount) in amounts {
                for column in amount.columns() {
                    needs.push((
                        table.to_string(),
                        column.to_string(),
                        format!("{key}.{name}"),
                    ));
                }
            }
            let joined = joins
                .iter()
                .map(|j| (format!("joins.{}", j.name), Some(&j.key)));
            let named = exprs.iter().map(|(n, e)| (n.to_string(), *e));
            for (name, expr) in named.chain(joined) {
                for column in expr.map(|e| e.columns_of("row")).unwrap_or_default() {
                    needs.push((table.to_string(), column, format!("{key}.{name}")));
                }
            }
        };
        let lines = |needs: &mut Vec<(String, String, String)>, key: &str, lines: &Lines| {
            let key = format!("{key}.lines");
            needs.push((
                lines.table.clone(),
                lines.parent.clone(),
                format!("{key}.parent"),
            ));
            needs.push((
                lines.table.clone(),
                lines.quantity.clone(),
                format!("{key}.quantity"),
            ));
            for column in lines.amount.columns() {
                needs.push((
                    lines.table.clone(),
                    column.to_string(),
                    format!("{key}.amount"),
                ));
            }
            for (name, expr) in [
                ("when", lines.when.as_ref()),
                ("sku", Some(&lines.sku)),
                ("discounted", lines.discounted.as_ref()),
                ("category", lines.category.as_ref()),
            ] {
                for column in expr.map(|e| e.columns_of("row")).unwrap_or_default() {
                    needs.push((lines.table.clone(), column, format!("{key}.{name}")));
                }
            }
        };
        for (i, order) in self.orders.iter().enumerate() {
            let key = format!("orders[{i}]");
            let exprs = [
                ("when", order.when.as_ref()),
                ("status", Some(&order.status)),
                ("currency", order.currency.as_ref()),
                ("channel", order.channel.as_ref()),
                ("customer", order.customer.as_ref()),
                ("email", order.email.as_ref()),
                ("phone", order.phone.as_ref()),
                ("card", order.card.as_ref()),
            ];
            let amounts = [
                ("earn_basis", &order.earn_basis),
                ("grand_total", &order.grand_total),
            ];
            document(
                &mut needs,
                &order.table,
                &order.key,
                &key,
                &amounts,
                &exprs,
                &order.joins,
            );
            if let Some(l) = &order.lines {
                lines(&mut needs, &key, l);
            }
        }
        for (i, customer) in self.customers.iter().enumerate() {
            let mut exprs: Vec<(&str, Option<&Expr>)> = customer.identifiers.named().to_vec();
            exprs.extend([
                ("when", customer.when.as_ref()),
                ("email_opt_in", customer.email_opt_in.as_ref()),
                ("sms_opt_in", customer.sms_opt_in.as_ref()),
                ("push_opt_in", customer.push_opt_in.as_ref()),
                ("timezone", customer.timezone.as_ref()),
                ("locale", customer.locale.as_ref()),
                ("push_token", customer.push_token.as_ref()),
                ("line_user_id", customer.line_user_id.as_ref()),
                ("profiling_opt_out", customer.profiling_opt_out.as_ref()),
            ]);
            let key = format!("customers[{i}]");
            document(
                &mut needs,
                &customer.table,
                &customer.key,
                &key,
                &[],
                &exprs,
                &customer.joins,
            );
        }
        for (i, redemption) in self.redemptions.iter().enumerate() {
            let mut exprs: Vec<(&str, Option<&Expr>)> = redemption.identifiers.named().to_vec();
            exprs.push(("when", redemption.when.as_ref()));
            let key = format!("redemptions[{i}]");
            let amounts = [("points", &redemption.points)];
            document(
                &mut needs,
                &redemption.table,
                &redemption.key,
                &key,
                &amounts,
                &exprs,
                &redemption.joins,
            );
        }
        for (i, wishlist) in self.wishlists.iter().enumerate() {
            let mut exprs: Vec<(&str, Option<&Expr>)> = wishlist.identifiers.named().to_vec();
            exprs.push(("when", wishlist.when.as_ref()));
            exprs.push(("product", Some(&wishlist.product)));
            document(
                &mut needs,
                &wishlist.table,
                &wishlist.key,
                &format!("wishlists[{i}]"),
                &[],
                &exprs,
                &wishlist.joins,
            );
        }
        for (i, price) in self.prices.iter().enumerate() {
            let exprs = [
                ("when", price.when.as_ref()),
                ("product", Some(&price.product)),
                ("sku", price.sku.as_ref()),
                ("currency", price.currency.as_ref()),
            ];
            document(
                &mut needs,
                &price.table,
                &price.key,
                &format!("prices[{i}]"),
                &[("price", &price.price)],
                &exprs,
                &price.joins,
            );
        }
        for (i, refund) in self.refunds.iter().enumerate() {
            let key = format!("refunds[{i}]");
            let exprs = [
                ("when", refund.when.as_ref()),
                ("order", Some(&refund.order)),
            ];
            let amounts = [("amount", &refund.amount)];
            document(
                &mut needs,
                &refund.table,
                &refund.key,
                &key,
                &amounts,
                &exprs,
                &refund.joins,
            );
            if let Some(l) = &refund.lines {
                lines(&mut needs, &key, l);
            }
        }
        needs
    }
}

fn compile(path: &Path, file: MappingFile, problem: &mut dyn FnMut(String, String)) -> Mapping {
    let expr = |key: String, text: &str, problem: &mut dyn FnMut(String, String)| {
        match Expr::compile(text) {
            Ok(e) => Some(e),
            Err(message) => {
                problem(
                    key,
                    format!("{message}; see https://github.com/google/cel-spec for the syntax"),
                );
                None
            }
        }
    };
    let amount = |key: String, terms: &[String], problem: &mut dyn FnMut(String, String)| {
        match Amount::parse(terms) {
            Ok(a) => a,
            Err(message) => {
                problem(key, message);
                Amount(Vec::new())
            }
        }
    };
    let mut names = HashSet::new();
    let references: Vec<Reference> = file
        .references
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if !names.insert(r.name.clone()) {
                problem(
                    format!("references[{i}].name"),
                    format!(
                        "`{}` is used twice; give each reference its own name",
                        r.name
                    ),
                );
            }
            Reference {
                name: r.name,
                table: r.table,
                key: r.key,
                columns: r.columns,
                pivot: r.pivot.map(|p| (p.name, p.value)),
            }
        })
        .collect();
    let joins =
        |key: String, files: Vec<JoinFile>, problem: &mut dyn FnMut(String, String)| -> Vec<Join> {
            files
                .into_iter()
                .enumerate()
                .filter_map(|(j, join)| {
                    let at = format!("{key}.joins[{j}]");
                    let Some(reference) = references.iter().position(|r| r.name == join.reference)
                    else {
                        problem(
                            format!("{at}.reference"),
                            format!(
                                "no `[[references]]` named `{}`; declare it{}",
                                join.reference,
                                if references.is_empty() {
                                    String::new()
                                } else {
                                    format!(
                                        " or use one of: {}",
                                        references
                                            .iter()
                                            .map(|r| r.name.as_str())
                                            .collect::<Vec<_>>()
                                            .join(", ")
                                    )
                                }
                            ),
                        );
                        return None;
                    };
                    if ["row", "before", "lines"].contains(&join.name.as_str()) {
                        problem(
                            format!("{at}.name"),
                            format!(
                                "`{}` is taken by the row variables; choose another name",
                                join.name
                            ),
                        );
                    }
                    let key = expr(format!("{at}.key"), &join.key, problem)?;
                    Some(Join {
                        name: join.name,
                        reference,
                        key,
                    })
                })
                .collect()
        };
    let lines = |key: String,
                 file: Option<LinesFile>,
                 problem: &mut dyn FnMut(String, String)|
     -> Option<Lines> {
        let file = file?;
        let when = file
            .when
            .as_deref()
            .and_then(|t| expr(format!("{key}.lines.when"), t, problem));
        let sku = expr(format!("{key}.lines.sku"), &file.sku, problem)?;
        let amount = amount(format!("{key}.lines.amount"), &file.amount, problem);
        let discounted = file
            .discounted
            .as_deref()
            .and_then(|t| expr(format!("{key}.lines.discounted"), t, problem));
        let category = file
            .category
            .as_deref()
            .and_then(|t| expr(format!("{key}.lines.category"), t, problem));
        Some(Lines {
            table: file.table,
            parent: file.parent,
            when,
            sku,
            quantity: file.quantity,
            amount,
            required: file.required,
            discounted,
            category,
        })
    };
    let optional = |key: String, text: Option<String>, problem: &mut dyn FnMut(String, String)| {
        text.and_then(|t| Expr::compile(&t).map_err(|m| problem(key, m)).ok())
    };

    let mut orders = Vec::new();
    for (i, order) in file.orders.into_iter().enumerate() {
        let key = format!("orders[{i}]");
        let mut statuses = Vec::new();
        let mut seen = HashSet::new();
        for (list, meaning) in [
            (&order.placed, StatusMeaning::Placed),
            (&order.completed, StatusMeaning::Completed),
            (&order.cancelled, StatusMeaning::Cancelled),
            (&order.refunded, StatusMeaning::Refunded),
            (&order.ignored, StatusMeaning::Ignored),
        ] {
            for status in list {
                if !seen.insert(status.clone()) {
                    problem(
                        key.clone(),
                        format!("status `{status}` is listed twice; give each status one meaning"),
                    );
                }
                statuses.push((status.clone(), meaning));
            }
        }
        if !statuses.iter().any(|(_, m)| *m == StatusMeaning::Completed) {
            problem(
                format!("{key}.completed"),
                "no status means completed, so no order would ever earn; list at least one".into(),
            );
        }
        let status = expr(format!("{key}.status"), &order.status, problem);
        let when = optional(format!("{key}.when"), order.when, problem);
        let currency = optional(format!("{key}.currency"), order.currency, problem);
        let channel = optional(format!("{key}.channel"), order.channel, problem);
        let customer = optional(format!("{key}.customer"), order.customer, problem);
        let email = optional(format!("{key}.email"), order.email, problem);
        let phone = optional(format!("{key}.phone"), order.phone, problem);
        let card = optional(format!("{key}.card"), order.card, problem);
        let earn_basis = amount(format!("{key}.earn_basis"), &order.earn_basis, problem);
        let grand_total = amount(format!("{key}.grand_total"), &order.grand_total, problem);
        let order_joins = joins(key.clone(), order.joins, problem);
        check_join_terms(
            &format!("{key}.earn_basis"),
            &earn_basis,
            &order_joins,
            &references,
            problem,
        );
        check_join_terms(
            &format!("{key}.grand_total"),
            &grand_total,
            &order_joins,
            &references,
            problem,
        );
        let order_lines = lines(key.clone(), order.lines, problem);
        if let Some(status) = status {
            orders.push(OrderMapping {
                table: order.table,
                key: order.key,
                when,
                status,
                statuses,
                earn_basis,
                grand_total,
                currency,
                channel,
                customer,
                email,
                phone,
                card,
                joins: order_joins,
                lines: order_lines,
            });
        }
    }
    let mut refunds = Vec::new();
    for (i, refund) in file.refunds.into_iter().enumerate() {
        let key = format!("refunds[{i}]");
        let when = optional(format!("{key}.when"), refund.when, problem);
        let order = expr(format!("{key}.order"), &refund.order, problem);
        let amount = amount(format!("{key}.amount"), &refund.amount, problem);
        let refund_joins = joins(key.clone(), refund.joins, problem);
        let refund_lines = lines(key.clone(), refund.lines, problem);
        check_join_terms(
            &format!("{key}.amount"),
            &amount,
            &refund_joins,
            &references,
            problem,
        );
        let of_grand_total = match refund.proportion_of.as_deref() {
            None | Some("earn_basis") => false,
            Some("grand_total") => true,
            Some(other) => {
                problem(
                    format!("{key}.proportion_of"),
                    format!(
                        "`{other}` is not a choice; use `earn_basis` (default) or `grand_total`"
                    ),
                );
                false
            }
        };
        if let Some(order) = order {
            refunds.push(RefundMapping {
                table: refund.table,
                key: refund.key,
                when,
                order,
                amount,
                of_grand_total,
                joins: refund_joins,
                lines: refund_lines,
            });
        }
    }
    let identifiers =
        |key: &str, exprs: [(&str, Option<String>); 4], problem: &mut dyn FnMut(String, String)| {
            let mut compiled = IdentifierExprs::default();
            for (name, text) in exprs {
                let expr = optional(format!("{key}.{name}"), text, problem);
                match name {
                    "customer" => compiled.customer = expr,
                    "email" => compiled.email = expr,
                    "phone" => compiled.phone = expr,
                    _ => compiled.card = expr,
                }
            }
            compiled
        };
    let mut customers = Vec::new();
    for (i, customer) in file.customers.into_iter().enumerate() {
        let key = format!("customers[{i}]");
        customers.push(CustomerMapping {
            when: optional(format!("{key}.when"), customer.when, problem),
            identifiers: identifiers(
                &key,
                [
                    ("customer", customer.customer),
                    ("email", customer.email),
                    ("phone", customer.phone),
                    ("card", customer.card),
                ],
                problem,
            ),
            email_opt_in: optional(
                format!("{key}.email_opt_in"),
                customer.email_opt_in,
                problem,
            ),
            sms_opt_in: optional(format!("{key}.sms_opt_in"), customer.sms_opt_in, problem),
            push_opt_in: optional(format!("{key}.push_opt_in"), customer.push_opt_in, problem),
            timezone: optional(format!("{key}.timezone"), customer.timezone, problem),
            locale: optional(format!("{key}.locale"), customer.locale, problem),
            push_token: optional(format!("{key}.push_token"), customer.push_token, problem),
            line_user_id: optional(
                format!("{key}.line_user_id"),
                customer.line_user_id,
                problem,
            ),
            profiling_opt_out: optional(
                format!("{key}.profiling_opt_out"),
                customer.profiling_opt_out,
                problem,
            ),
            joins: joins(key.clone(), customer.joins, problem),
            table: customer.table,
            key: customer.key,
        });
    }
    let mut redemptions = Vec::new();
    for (i, redemption) in file.redemptions.into_iter().enumerate() {
        let key = format!("redemptions[{i}]");
        let points = amount(format!("{key}.points"), &redemption.points, problem);
        let redemption_joins = joins(key.clone(), redemption.joins, problem);
        check_join_terms(
            &format!("{key}.points"),
            &points,
            &redemption_joins,
            &references,
            problem,
        );
        redemptions.push(RedemptionMapping {
            when: optional(format!("{key}.when"), redemption.when, problem),
            points,
            identifiers: identifiers(
                &key,
                [
                    ("customer", redemption.customer),
                    ("email", redemption.email),
                    ("phone", redemption.phone),
                    ("card", redemption.card),
                ],
                problem,
            ),
            joins: redemption_joins,
            table: redemption.table,
            key: redemption.key,
        });
    }
    let mut wishlists = Vec::new();
    for (i, wishlist) in file.wishlists.into_iter().enumerate() {
        let key = format!("wishlists[{i}]");
        let product = expr(format!("{key}.product"), &wishlist.product, problem);
        let compiled_identifiers = identifiers(
            &key,
            [
                ("customer", wishlist.customer),
                ("email", wishlist.email),
                ("phone", wishlist.phone),
                ("card", wishlist.card),
            ],
            problem,
        );
        if compiled_identifiers
            .named()
            .iter()
            .all(|(_, e)| e.is_none())
        {
            problem(
                key.clone(),
                "no identifier: name the customer, email, phone or card of the wishlist's owner"
                    .into(),
            );
        }
        let when = optional(format!("{key}.when"), wishlist.when, problem);
        let wishlist_joins = joins(key.clone(), wishlist.joins, problem);
        if let Some(product) = product {
            wishlists.push(WishlistMapping {
                table: wishlist.table,
                key: wishlist.key,
                when,
                product,
                identifiers: compiled_identifiers,
                joins: wishlist_joins,
            });
        }
    }
    let mut prices = Vec::new();
    for (i, price) in file.prices.into_iter().enumerate() {
        let key = format!("prices[{i}]");
        let product = expr(format!("{key}.product"), &price.product, problem);
        let amount = amount(format!("{key}.price"), &price.price, problem);
        let price_joins = joins(key.clone(), price.joins, problem);
        check_join_terms(
            &format!("{key}.price"),
            &amount,
            &price_joins,
            &references,
            problem,
        );
        let when = optional(format!("{key}.when"), price.when, problem);
        let sku = optional(format!("{key}.sku"), price.sku, problem);
        let currency = optional(format!("{key}.currency"), price.currency, problem);
        if let Some(product) = product {
            prices.push(PriceMapping {
                table: price.table,
                key: price.key,
                when,
                product,
                price: amount,
                sku,
                currency,
                joins: price_joins,
            });
        }
    }
    Mapping {
        path: path.to_path_buf(),
        system: file.system,
        kind: file.kind,
        references,
        orders,
        refunds,
        customers,
        redemptions,
        wishlists,
        prices,
    }
}

/// A `join.col` term must name a join of its document and a column its
/// reference keeps.
fn check_join_terms(
    key: &str,
    amount: &Amount,
    joins: &[Join],
    references: &[Reference],
    problem: &mut dyn FnMut(String, String),
) {
    for term in &amount.0 {
        let Some(name) = &term.join else { continue };
        match joins.iter().find(|j| j.name == *name) {
            None => problem(
                key.to_string(),
                format!("`{name}.{}` names no join of this document; add a `joins` entry named `{name}`", term.column),
            ),
            Some(join) if !references[join.reference].columns.contains(&term.column) => problem(
                key.to_string(),
                format!(
                    "`{name}.{}`: reference `{}` does not keep column `{}`; add it to its `columns`",
                    term.column, references[join.reference].name, term.column
                ),
            ),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Mapping, Vec<ConfigProblem>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.toml");
        std::fs::write(&path, text).unwrap();
        Mapping::load(&path)
    }

    #[test]
    fn the_shipped_mappings_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/sources");
        for file in [
            "odoo-pos.toml",
            "magento2.toml",
            "woocommerce-hpos.toml",
            "saleor.toml",
        ] {
            let mapping =
                Mapping::load(&dir.join(file)).unwrap_or_else(|p| panic!("{file}: {p:?}"));
            assert!(
                !mapping.orders.is_empty() && !mapping.refunds.is_empty(),
                "{file}"
            );
        }
    }

    #[test]
    fn every_mistake_in_a_mapping_is_named_with_its_key_and_fix() {
        let problems = load(
            r#"
system = "Shop"
kind = "mysql"

[[orders]]
table = "orders"
key = "id"
status = "row.state =="
placed = ["new"]
completed = ["done", "new"]
earn_basis = ["total", "-", "ship.amount"]
grand_total = ["total", "ship.amount"]

[[orders.joins]]
name = "store"
reference = "stores"
key = "row.store_id"

[[refunds]]
table = "refunds"
key = "id"
order = "row.order_id"
amount = ["amount"]
proportion_of = "gross"

[[wishlists]]
table = "wishlist_item"
key = "id"
product = "row.product_id +"

[[prices]]
table = "prices"
key = "id"
product = "string(row.product_id)"
price = ["value", "attr.rate"]
"#,
        )
        .unwrap_err();
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        let expect = [
            "orders[0]: status `new` is listed twice",
            "orders[0].status: not a valid CEL expression",
            "orders[0].earn_basis: `-` is not a column",
            "orders[0].joins[0].reference: no `[[references]]` named `stores`",
            "orders[0].grand_total: `ship.amount` names no join of this document",
            "refunds[0].proportion_of: `gross` is not a choice",
            "wishlists[0]: no identifier: name the customer",
            "wishlists[0].product: not a valid CEL expression",
            "prices[0].price: `attr.rate` names no join of this document",
        ];
        for expected in expect {
            assert!(
                text.iter().any(|t| t.starts_with(expected)),
                "missing `{expected}` in {text:#?}"
            );
        }
        assert!(problems.iter().all(|p| p.origin.ends_with("shop.toml")));
    }

    #[test]
    fn amounts_are_exact_and_say_which_column_failed() {
        let amount = Amount::parse(&["total".into(), "-tax".into(), "ship?".into()]).unwrap();
        let value = |t: &Term| match t.column.as_str() {
            "total" => Some(AmountValue::Number("119.99".parse().unwrap())),
            "tax" => Some(AmountValue::Number("19.15".parse().unwrap())),
            _ => Some(AmountValue::Null),
        };
        assert_eq!(
            amount.sum(value).unwrap(),
            "100.84".parse::<Decimal>().unwrap()
        );
        let unparsable = amount.sum(|t| {
            (t.column == "tax")
                .then_some(AmountValue::Unparsable)
                .or(Some(AmountValue::Number(Decimal::ONE)))
        });
        assert_eq!(unparsable.unwrap_err(), "unparsable amount in column `tax`");
        let null = amount.sum(|_| Some(AmountValue::Null));
        assert_eq!(null.unwrap_err(), "NULL amount in column `total`");
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let problems =
            load("system = \"x\"\nkind = \"mysql\"\n[[orders]]\ntable = 5\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "line 4");
    }
}

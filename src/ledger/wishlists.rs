//! Wishlists and product prices (`wishlist_items`, `product_prices`): which
//! members wait for which product, what it costs, and the price drops worth
//! telling them about.
//!
//! A drop is judged against the price the member last saw
//! (`noticed_price`): the price when they added the item (or the first
//! price known after), lowered each time a drop is announced. So a product
//! that goes 100 → 80 → 100 → 80 is news once, a further fall to 70 is news
//! again, and replays, restarts and repeated updates at the same price are
//! never news.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::db::Db;

/// A wishlisted product's price fell far enough below what a member last
/// saw.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceDrop {
    pub member: i64,
    pub product: String,
    pub sku: Option<String>,
    pub currency: Option<String>,
    pub price: Decimal,
    /// The price the member last saw.
    pub previous: Decimal,
}

impl PriceDrop {
    /// How much cheaper, in percent of `previous`, to one decimal.
    pub fn percent(&self) -> Decimal {
        if self.previous.is_zero() {
            return Decimal::ZERO;
        }
        ((self.previous - self.price) * Decimal::from(100) / self.previous).round_dp(1)
    }
}

/// A member put `product` on a wishlist (or the item changed). The price
/// they see is the one known now; an item moved to another product starts
/// again from that product's price.
pub async fn save_item(
    db: &Db,
    source: &str,
    item_ref: &str,
    member: i64,
    product: &str,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "INSERT INTO wishlist_items (source, item_ref, member_id, product, added_at, noticed_price)
         VALUES ($1, $2, $3, $4, $5,
                 (SELECT price FROM product_prices WHERE source = $1 AND product = $4))
         ON CONFLICT (source, item_ref) DO UPDATE SET
             member_id = EXCLUDED.member_id,
             product = EXCLUDED.product,
             added_at = CASE WHEN wishlist_items.product = EXCLUDED.product
                             THEN wishlist_items.added_at ELSE EXCLUDED.added_at END,
             noticed_price = CASE WHEN wishlist_items.product = EXCLUDED.product
                                  THEN coalesce(wishlist_items.noticed_price, EXCLUDED.noticed_price)
                                  ELSE EXCLUDED.noticed_price END",
        &[&source, &item_ref, &member, &product, &at],
    )
    .await?;
    Ok(())
}

/// The item left the wishlist (deleted, bought, moved to the cart).
pub async fn remove_item(
    db: &Db,
    source: &str,
    item_ref: &str,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "DELETE FROM wishlist_items WHERE source = $1 AND item_ref = $2",
        &[&source, &item_ref],
    )
    .await?;
    Ok(())
}

/// What a source states a product costs now.
#[derive(Debug, Clone, Copy)]
pub struct StatedPrice<'a> {
    pub product: &'a str,
    pub price: Decimal,
    pub sku: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub at: DateTime<Utc>,
}

/// Records a product's price and returns the drops it makes for members
/// waiting for it: at least `min_drop_percent` below what each member last
/// saw, which becomes the new price (items added before any price was
/// known see this one, as no drop). One per member, by member: several
/// items of the same product count once. (Merges move items to the
/// survivor and erasure deletes them, so every item's member is current.)
pub async fn state_price(
    db: &Db,
    source: &str,
    stated: StatedPrice<'_>,
    min_drop_percent: Decimal,
) -> Result<Vec<PriceDrop>, tokio_postgres::Error> {
    let StatedPrice {
        product,
        price,
        sku,
        currency,
        at,
    } = stated;
    let keep = Decimal::ONE - min_drop_percent / Decimal::from(100);
    // One round trip: the price, then the items it is news for. The old
    // price an item saw is read from the row as it was (the self-join sees
    // the statement's snapshot).
    let stated_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&source, &product, &price, &sku, &currency, &at];
    let item_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&source, &product, &price, &keep];
    let (stated_row, items) = futures_util::try_join!(
        db.query_one(
            "INSERT INTO product_prices (source, product, price, sku, currency, changed_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (source, product) DO UPDATE SET
                 price = EXCLUDED.price,
                 sku = coalesce(EXCLUDED.sku, product_prices.sku),
                 currency = coalesce(EXCLUDED.currency, product_prices.currency),
                 changed_at = EXCLUDED.changed_at
             RETURNING sku, currency",
            &stated_params,
        ),
        db.query(
            "UPDATE wishlist_items w SET noticed_price = $3
               FROM wishlist_items before
              WHERE w.source = $1 AND w.product = $2
                AND before.source = w.source AND before.item_ref = w.item_ref
                AND (w.noticed_price IS NULL OR $3 <= w.noticed_price * $4)
             RETURNING w.member_id, before.noticed_price",
            &item_params,
        ),
    )?;
    let (sku, currency): (Option<String>, Option<String>) = (stated_row.get(0), stated_row.get(1));
    let mut drops: std::collections::BTreeMap<i64, PriceDrop> = std::collections::BTreeMap::new();
    for row in items {
        // NULL before: the first price this item saw, not a drop.
        let Some(previous) = row.get::<_, Option<Decimal>>(1) else {
            continue;
        };
        let drop = drops
            .entry(row.get(0))
            .or_insert_with_key(|&member| PriceDrop {
                member,
                product: product.to_string(),
                sku: sku.clone(),
                currency: currency.clone(),
                price,
                previous,
            });
        drop.previous = drop.previous.max(previous);
    }
    Ok(drops.into_values().collect())
}

/// A merged member's wishlist is the survivor's.
pub async fn merge(db: &Db, from: i64, into: i64) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "UPDATE wishlist_items SET member_id = $2 WHERE member_id = $1",
        &[&from, &into],
    )
    .await?;
    Ok(())
}

/// An erased member's wishlist goes with them.
pub async fn forget(db: &Db, members: &[i64]) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        "DELETE FROM wishlist_items WHERE member_id = ANY($1)",
        &[&members],
    )
    .await
}

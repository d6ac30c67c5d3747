-- Price drops on wishlisted products.
--
-- `product_prices`: the last price each source stated for a product (a
-- mapping's `[[prices]]`), so a change is judged against the price before
-- it whether or not the source sends before-images.
CREATE TABLE product_prices (
    source     text        NOT NULL,
    product    text        NOT NULL,
    price      numeric     NOT NULL,
    sku        text,
    currency   text,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (source, product)
);

-- `wishlist_items`: what members put on their wishlists (a mapping's
-- `[[wishlists]]`; a delete at the source removes the row). `noticed_price`
-- is the price the member last saw: the price when the item was added (or
-- the first price known after), lowered each time a drop is announced. A
-- drop is news only below it, so the same drop is never announced twice.
CREATE TABLE wishlist_items (
    source        text        NOT NULL,
    item_ref      text        NOT NULL,
    member_id     bigint      NOT NULL REFERENCES members (member_id),
    product       text        NOT NULL,
    added_at      timestamptz NOT NULL,
    noticed_price numeric,
    PRIMARY KEY (source, item_ref)
);
CREATE INDEX wishlist_items_product ON wishlist_items (source, product);
CREATE INDEX wishlist_items_member ON wishlist_items (member_id);

-- Cross-sell: how many members bought each product, and each pair of
-- products ("bought X also bought Y"), counted once per member, kept by
-- the ledger at commit when a member buys a product for the first time.
-- `product_buyers` row '*' counts the members who bought anything (the N
-- of lift = pair × N / (buyers X × buyers Y)).
CREATE TABLE product_buyers (
    product text PRIMARY KEY,
    members bigint NOT NULL
);

CREATE TABLE co_purchases (
    product_a text   NOT NULL,
    product_b text   NOT NULL,
    members   bigint NOT NULL,
    PRIMARY KEY (product_a, product_b)
);

-- The ledgers of earlier versions: counted from what members bought.
INSERT INTO product_buyers (product, members)
SELECT product, count(*) FROM member_products GROUP BY product;
INSERT INTO product_buyers (product, members)
SELECT '*', count(DISTINCT member_id) FROM member_products HAVING count(*) > 0;
INSERT INTO co_purchases (product_a, product_b, members)
SELECT a.product, b.product, count(*)
  FROM member_products a JOIN member_products b ON a.member_id = b.member_id AND a.product <> b.product
 GROUP BY a.product, b.product;

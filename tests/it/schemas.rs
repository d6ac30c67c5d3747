//! The harness loads the real retail schemas from `../shared/schemas/`
//! into per-test databases; later tests build on these layouts.

use mysql_async::prelude::Queryable;

use crate::support::{MyDatabase, PgDatabase};

async fn pg_tables(db: &PgDatabase) -> Vec<String> {
    db.client()
        .await
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn my_tables(db: &MyDatabase) -> Vec<String> {
    db.conn()
        .await
        .exec(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? ORDER BY 1",
            (&db.name,),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn odoo_pos_and_saleor_schemas_load_into_postgres() {
    let odoo = PgDatabase::create("odoo").await;
    odoo.load_schema("odoo-pos.postgres.sql").await;
    let tables = pg_tables(&odoo).await;
    for table in [
        "pos_order",
        "pos_order_line",
        "res_partner",
        "pos_config",
        "loyalty_card",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    let saleor = PgDatabase::create("saleor").await;
    saleor.load_schema("saleor.postgres.sql").await;
    let tables = pg_tables(&saleor).await;
    for table in [
        "order_order",
        "order_orderline",
        "account_user",
        "order_ordergrantedrefund",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}

#[tokio::test]
async fn magento_and_woocommerce_schemas_load_into_mariadb() {
    let magento = MyDatabase::create("magento").await;
    magento.load_schema("magento2.mysql.sql").await;
    let tables = my_tables(&magento).await;
    for table in [
        "sales_order",
        "sales_order_item",
        "sales_creditmemo",
        "customer_entity",
        "store",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    let woo = MyDatabase::create("woo").await;
    woo.load_schema("woocommerce-hpos.mysql.sql").await;
    let tables = my_tables(&woo).await;
    for table in [
        "wp_wc_orders",
        "wp_woocommerce_order_items",
        "wp_woocommerce_order_itemmeta",
        "wp_usermeta",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}

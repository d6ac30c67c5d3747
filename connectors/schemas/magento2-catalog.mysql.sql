-- =============================================================================
-- Magento Open Source 2.4: wishlists and catalog prices. Subset of the real
-- MySQL/MariaDB layout, to load after ../../../shared/schemas/magento2.mysql.sql
-- (its `store` and `customer_entity` are referenced here).
-- =============================================================================
--
-- The shared schema subsets carry no wishlist or catalog tables; the price
-- drop trigger needs them. Written by hand, the same way as the shared
-- files, from the declarative schema:
--   app/code/Magento/Wishlist/etc/db_schema.xml  (wishlist, wishlist_item)
--   app/code/Magento/Catalog/etc/db_schema.xml   (catalog_product_entity,
--                                                 catalog_product_entity_decimal)
--   app/code/Magento/Eav/etc/db_schema.xml       (eav_attribute)
--   app/code/Magento/Catalog/Setup/CategorySetup.php (the `price` and
--     `special_price` attributes of entity type 4, `catalog_product`)
--
-- Magento keeps a product's price in the EAV value table of its backend type
-- (`decimal`): one row per product, attribute and store view; store 0 is the
-- default scope. Moving an item to the cart deletes its `wishlist_item` row.
--
-- Left out: wishlist_item_option, every other EAV value table and attribute,
-- the price index tables (rebuilt by the indexer, not written by an edit),
-- and every column a price drop does not need.

CREATE TABLE `eav_attribute` (
  `attribute_id` smallint unsigned NOT NULL AUTO_INCREMENT,
  `entity_type_id` smallint unsigned NOT NULL DEFAULT '0',
  `attribute_code` varchar(255) NOT NULL,
  `backend_type` varchar(8) NOT NULL DEFAULT 'static',
  `frontend_input` varchar(50) DEFAULT NULL,
  `frontend_label` varchar(255) DEFAULT NULL,
  `is_required` smallint unsigned NOT NULL DEFAULT '0',
  `is_user_defined` smallint unsigned NOT NULL DEFAULT '0',
  PRIMARY KEY (`attribute_id`),
  UNIQUE KEY `EAV_ATTRIBUTE_ENTITY_TYPE_ID_ATTRIBUTE_CODE` (`entity_type_id`, `attribute_code`)
) ENGINE=InnoDB;

CREATE TABLE `catalog_product_entity` (
  `entity_id` int unsigned NOT NULL AUTO_INCREMENT,
  `attribute_set_id` smallint unsigned NOT NULL DEFAULT '0',
  `type_id` varchar(32) NOT NULL DEFAULT 'simple',
  `sku` varchar(64) NOT NULL,
  `has_options` smallint NOT NULL DEFAULT '0',
  `required_options` smallint unsigned NOT NULL DEFAULT '0',
  `created_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `updated_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (`entity_id`),
  KEY `CATALOG_PRODUCT_ENTITY_ATTRIBUTE_SET_ID` (`attribute_set_id`),
  KEY `CATALOG_PRODUCT_ENTITY_SKU` (`sku`)
) ENGINE=InnoDB;

CREATE TABLE `catalog_product_entity_decimal` (
  `value_id` int NOT NULL AUTO_INCREMENT,
  `attribute_id` smallint unsigned NOT NULL DEFAULT '0',
  `store_id` smallint unsigned NOT NULL DEFAULT '0',
  `entity_id` int unsigned NOT NULL DEFAULT '0',
  `value` decimal(20,6) DEFAULT NULL,
  PRIMARY KEY (`value_id`),
  UNIQUE KEY `CATALOG_PRODUCT_ENTITY_DECIMAL_ENTITY_ID_ATTRIBUTE_ID_STORE_ID` (`entity_id`, `attribute_id`, `store_id`),
  KEY `CATALOG_PRODUCT_ENTITY_DECIMAL_STORE_ID` (`store_id`),
  KEY `CATALOG_PRODUCT_ENTITY_DECIMAL_ATTRIBUTE_ID` (`attribute_id`),
  CONSTRAINT `CAT_PRD_ENTT_DEC_ATTR_ID_EAV_ATTR_ATTR_ID` FOREIGN KEY (`attribute_id`) REFERENCES `eav_attribute` (`attribute_id`) ON DELETE CASCADE,
  CONSTRAINT `CAT_PRD_ENTT_DEC_ENTT_ID_CAT_PRD_ENTT_ENTT_ID` FOREIGN KEY (`entity_id`) REFERENCES `catalog_product_entity` (`entity_id`) ON DELETE CASCADE,
  CONSTRAINT `CATALOG_PRODUCT_ENTITY_DECIMAL_STORE_ID_STORE_STORE_ID` FOREIGN KEY (`store_id`) REFERENCES `store` (`store_id`) ON DELETE CASCADE
) ENGINE=InnoDB;

CREATE TABLE `wishlist` (
  `wishlist_id` int unsigned NOT NULL AUTO_INCREMENT,
  `customer_id` int unsigned NOT NULL DEFAULT '0',
  `shared` smallint unsigned NOT NULL DEFAULT '0',
  `sharing_code` varchar(32) DEFAULT NULL,
  `updated_at` timestamp NULL DEFAULT NULL,
  PRIMARY KEY (`wishlist_id`),
  UNIQUE KEY `WISHLIST_CUSTOMER_ID` (`customer_id`),
  KEY `WISHLIST_SHARED` (`shared`),
  CONSTRAINT `WISHLIST_CUSTOMER_ID_CUSTOMER_ENTITY_ENTITY_ID` FOREIGN KEY (`customer_id`) REFERENCES `customer_entity` (`entity_id`) ON DELETE CASCADE
) ENGINE=InnoDB;

CREATE TABLE `wishlist_item` (
  `wishlist_item_id` int unsigned NOT NULL AUTO_INCREMENT,
  `wishlist_id` int unsigned NOT NULL DEFAULT '0',
  `product_id` int unsigned NOT NULL DEFAULT '0',
  `store_id` smallint unsigned DEFAULT NULL,
  `added_at` timestamp NULL DEFAULT NULL,
  `description` text DEFAULT NULL,
  `qty` decimal(12,4) NOT NULL,
  PRIMARY KEY (`wishlist_item_id`),
  KEY `WISHLIST_ITEM_WISHLIST_ID` (`wishlist_id`),
  KEY `WISHLIST_ITEM_PRODUCT_ID` (`product_id`),
  KEY `WISHLIST_ITEM_STORE_ID` (`store_id`),
  CONSTRAINT `WISHLIST_ITEM_WISHLIST_ID_WISHLIST_WISHLIST_ID` FOREIGN KEY (`wishlist_id`) REFERENCES `wishlist` (`wishlist_id`) ON DELETE CASCADE,
  CONSTRAINT `WISHLIST_ITEM_PRODUCT_ID_CATALOG_PRODUCT_ENTITY_ENTITY_ID` FOREIGN KEY (`product_id`) REFERENCES `catalog_product_entity` (`entity_id`) ON DELETE CASCADE,
  CONSTRAINT `WISHLIST_ITEM_STORE_ID_STORE_STORE_ID` FOREIGN KEY (`store_id`) REFERENCES `store` (`store_id`) ON DELETE SET NULL
) ENGINE=InnoDB;

-- The installer's product price attributes (ids as a fresh 2.4 install
-- gives them; mappings look them up by code, not by id).
INSERT INTO `eav_attribute` (`attribute_id`, `entity_type_id`, `attribute_code`, `backend_type`, `frontend_input`, `frontend_label`, `is_required`)
VALUES (77, 4, 'price', 'decimal', 'price', 'Price', 1),
       (78, 4, 'special_price', 'decimal', 'price', 'Special Price', 0);

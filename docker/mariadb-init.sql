-- Run once by the mariadb image on an empty data directory. The image has
-- created the `loyalty` user and the `shop` database; give the user what a
-- binlog reader needs (see `loyalty-cdc check`).
GRANT SELECT ON shop.* TO 'loyalty'@'%';
GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'loyalty'@'%';

-- Run once by the postgres image on an empty data directory.
-- The ledger and the point-of-sale database live on the same server here;
-- in production the POS database is the retailer's own.
CREATE DATABASE loyalty;
CREATE DATABASE pos;

//! MySQL and MariaDB sources, read through the row-based binlog.
//!
//! - `preflight.rs`: what the server and user must provide (log_bin, ROW
//!   format, FULL row image and metadata, replication privileges, a free
//!   `server_id`).
//! - `gtid.rs`: MariaDB GTIDs and GTID lists (positions), and the MariaDB
//!   events that carry them.
//! - `rows.rs`: row images decoded by a plan built once per TABLE_MAP.
//! - `reader.rs`: the binlog reader: streaming and resume.
//! - `snapshot.rs`: the lock-free consistent snapshot (MariaDB).
//!
//! The binlog client, schema tracking and snapshot arrive with the MySQL /
//! MariaDB source issue.

pub mod gtid;
pub mod preflight;
pub mod reader;
pub mod rows;
pub mod snapshot;

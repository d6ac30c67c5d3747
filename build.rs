//! The ledger's migrations are embedded in the binary (refinery's
//! `embed_migrations!`), which cargo does not know reads `migrations/`:
//! without this, a new migration file would not be in the next build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

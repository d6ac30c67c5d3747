//! `member erase` and `DELETE /v1/members/{id}`: GDPR erasure. First every
//! provider that can erase a person is asked to (it needs the address,
//! which the ledger is about to forget); then, in one ledger transaction,
//! the member's personal data goes (identifiers, profile, the member's
//! values in stored source rows), its unsent messages are cancelled and
//! its scheduled triggers dropped. Points, entries and orders stay under
//! the bare member id. Erasing again is a no-op.

use serde::Serialize;

use crate::config::Settings;
use crate::delivery::erase::ProviderErasure;
use crate::identity::Identity;
use crate::ledger::db::Db;
use crate::ledger::members::{self, Contact, Erased};

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Erasure {
    /// Erased now.
    Erased {
        member_id: i64,
        #[serde(flatten)]
        erased: Erased,
        messages_cancelled: u64,
        providers: Vec<ProviderErasure>,
    },
    /// Erased before: nothing left to do.
    AlreadyErased { member_id: i64 },
    /// A provider could not be asked: nothing was erased here, so the
    /// request can be repeated with the address still known.
    ProvidersFailed {
        member_id: i64,
        providers: Vec<ProviderErasure>,
    },
}

/// Who an erasure is about: the member's contact (the addresses the
/// providers need), or the answer when there is nothing to do.
pub enum Target {
    Member(Contact),
    Nothing(Erasure),
}

/// The contact of `member` (its survivor, if merged), unless it was erased
/// before.
pub async fn target(db: &Db, member: i64) -> Result<Target, tokio_postgres::Error> {
    let Some(contact) = members::contacts(db, &[member]).await?.remove(&member) else {
        return Ok(Target::Nothing(Erasure::AlreadyErased {
            member_id: member,
        }));
    };
    if contact.erased || members::is_erased(db, contact.member_id).await? {
        return Ok(Target::Nothing(Erasure::AlreadyErased {
            member_id: contact.member_id,
        }));
    }
    Ok(Target::Member(contact))
}

/// Asks the providers (none with `local_only`). Holds no ledger lock: the
/// requests may take a while.
pub async fn ask_providers(
    settings: &Settings,
    contact: &Contact,
    local_only: bool,
) -> Vec<ProviderErasure> {
    if local_only {
        Vec::new()
    } else {
        crate::delivery::erase::request(settings, contact).await
    }
}

/// The ledger's part, once every provider accepted: one transaction.
pub async fn erase_here(
    db: &Db,
    identity: &Identity,
    contact: &Contact,
    providers: Vec<ProviderErasure>,
) -> Result<Erasure, tokio_postgres::Error> {
    let member = contact.member_id;
    if providers.iter().any(|p| !p.done) {
        return Ok(Erasure::ProvidersFailed {
            member_id: member,
            providers,
        });
    }
    db.batch_execute("BEGIN").await?;
    let done = async {
        let erased = members::erase_personal_data(db, identity, member, chrono::Utc::now()).await?;
        let cancelled = crate::delivery::outbox::forget_members(db, &erased.members).await?;
        crate::triggers::schedule::forget_members(db, &erased.members).await?;
        Ok::<_, tokio_postgres::Error>((erased, cancelled))
    }
    .await;
    match done {
        Ok((erased, messages_cancelled)) => {
            db.batch_execute("COMMIT").await?;
            tracing::info!(
                member_id = member,
                identifiers = erased.identifiers,
                source_rows = erased.source_rows,
                messages_cancelled,
                "member erased"
            );
            Ok(Erasure::Erased {
                member_id: member,
                erased,
                messages_cancelled,
                providers,
            })
        }
        Err(error) => {
            let _ = db.batch_execute("ROLLBACK").await;
            Err(error)
        }
    }
}

/// Erases `member` (the survivor, if it was merged into another). With
/// `local_only`, providers are not asked (the operator erased there by
/// hand).
pub async fn erase(
    settings: &Settings,
    db: &Db,
    identity: &Identity,
    member: i64,
    local_only: bool,
) -> Result<Erasure, tokio_postgres::Error> {
    let contact = match target(db, member).await? {
        Target::Member(contact) => contact,
        Target::Nothing(answer) => return Ok(answer),
    };
    let providers = ask_providers(settings, &contact, local_only).await;
    erase_here(db, identity, &contact, providers).await
}

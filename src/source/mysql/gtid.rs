//! MariaDB global transaction ids, and the MariaDB-only binlog events that
//! carry them.
//!
//! A MariaDB GTID is `domain-server-sequence`. Within a domain, sequence
//! numbers grow in commit order, so "where a reader stands" is one GTID per
//! domain: a [`GtidList`], the form `@@gtid_binlog_pos`,
//! `@@slave_connect_state` and the ledger's stored position use
//! (`0-1-100,1-2-57`). A transaction is already applied iff its sequence is
//! at or below the list's entry for its domain.
//!
//! mysql_common does not know events 0xa0–0xa3 (it returns `Ok(None)` for
//! them), so the GTID (0xa2) and GTID_LIST (0xa3) bodies are parsed here,
//! by hand, bounds-checked.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One MariaDB GTID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub sequence: u64,
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.sequence)
    }
}

impl FromStr for Gtid {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{text}` is not a MariaDB GTID (expected domain-server-sequence, e.g. 0-1-100)"
            )
        };
        let mut parts = text.trim().splitn(3, '-');
        let mut next = || parts.next().ok_or_else(bad);
        Ok(Gtid {
            domain: next()?.parse().map_err(|_| bad())?,
            server: next()?.parse().map_err(|_| bad())?,
            sequence: next()?.parse().map_err(|_| bad())?,
        })
    }
}

/// The last GTID per replication domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GtidList(BTreeMap<u32, Gtid>);

impl GtidList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn gtids(&self) -> impl Iterator<Item = &Gtid> {
        self.0.values()
    }

    /// Records `gtid` as the newest of its domain.
    pub fn advance(&mut self, gtid: Gtid) {
        self.0.insert(gtid.domain, gtid);
    }

    /// Whether the transaction `gtid` is at or below this list (applied).
    pub fn includes(&self, gtid: &Gtid) -> bool {
        self.0
            .get(&gtid.domain)
            .is_some_and(|last| gtid.sequence <= last.sequence)
    }
}

impl fmt::Display for GtidList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for gtid in self.0.values() {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "{gtid}")?;
            first = false;
        }
        Ok(())
    }
}

impl FromStr for GtidList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut list = GtidList::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let gtid: Gtid = part.parse()?;
            if list.0.insert(gtid.domain, gtid).is_some() {
                return Err(format!("`{text}` names domain {} twice", gtid.domain));
            }
        }
        Ok(list)
    }
}

/// A MariaDB binlog event body that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed MariaDB {event} event: {problem}")]
pub struct EventError {
    pub event: &'static str,
    pub problem: String,
}

fn take<const N: usize>(
    body: &mut &[u8],
    event: &'static str,
    what: &str,
) -> Result<[u8; N], EventError> {
    if body.len() < N {
        return Err(EventError {
            event,
            problem: format!("truncated: {what} needs {N} bytes, {} left", body.len()),
        });
    }
    let (head, rest) = body.split_at(N);
    *body = rest;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok(out)
}

/// Flag of a GTID event: a commit id for group commit follows.
const FL_GROUP_COMMIT_ID: u8 = 2;
/// Flag of a GTID event: the transaction is a single standalone statement
/// (DDL or a non-transactional engine), with no BEGIN/COMMIT around it.
pub const FL_STANDALONE: u8 = 1;

/// The body of a MariaDB GTID event (type 0xa2), after the common header
/// (and without the checksum). `server` comes from the event header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GtidEvent {
    pub gtid: Gtid,
    pub flags: u8,
}

impl GtidEvent {
    pub fn parse(mut body: &[u8], server: u32) -> Result<Self, EventError> {
        const EVENT: &str = "GTID";
        let sequence = u64::from_le_bytes(take::<8>(&mut body, EVENT, "sequence")?);
        let domain = u32::from_le_bytes(take::<4>(&mut body, EVENT, "domain")?);
        let [flags] = take::<1>(&mut body, EVENT, "flags")?;
        if flags & FL_GROUP_COMMIT_ID != 0 {
            take::<8>(&mut body, EVENT, "commit id")?;
        }
        Ok(GtidEvent {
            gtid: Gtid {
                domain,
                server,
                sequence,
            },
            flags,
        })
    }

    /// A standalone statement (DDL): its QUERY event is the whole
    /// transaction.
    pub fn is_standalone(&self) -> bool {
        self.flags & FL_STANDALONE != 0
    }
}

/// The body of a MariaDB GTID_LIST event (type 0xa3): the binlog state at
/// the start of a binlog file.
pub fn parse_gtid_list(mut body: &[u8]) -> Result<GtidList, EventError> {
    const EVENT: &str = "GTID_LIST";
    // The top 4 bits are flags; the count is the low 28.
    let count = u32::from_le_bytes(take::<4>(&mut body, EVENT, "count")?) & 0x0fff_ffff;
    if (body.len() as u64) < u64::from(count) * 16 {
        return Err(EventError {
            event: EVENT,
            problem: format!("{count} entries do not fit in {} bytes", body.len()),
        });
    }
    let mut list = GtidList::default();
    for _ in 0..count {
        let domain = u32::from_le_bytes(take::<4>(&mut body, EVENT, "domain")?);
        let server = u32::from_le_bytes(take::<4>(&mut body, EVENT, "server")?);
        let sequence = u64::from_le_bytes(take::<8>(&mut body, EVENT, "sequence")?);
        list.advance(Gtid {
            domain,
            server,
            sequence,
        });
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_lists_round_trip_and_judge_what_is_applied() {
        let list: GtidList = "1-2-57, 0-1-100".parse().unwrap();
        assert_eq!(list.to_string(), "0-1-100,1-2-57");
        assert!(
            list.includes(&"0-3-100".parse().unwrap()),
            "same domain, at the sequence"
        );
        assert!(!list.includes(&"0-1-101".parse().unwrap()));
        assert!(
            !list.includes(&"2-1-1".parse().unwrap()),
            "a domain never seen"
        );
        assert!("0-1".parse::<GtidList>().is_err());
        assert!("0-1-5,0-2-6".parse::<GtidList>().is_err());
        assert_eq!("".parse::<GtidList>().unwrap(), GtidList::default());
    }

    #[test]
    fn gtid_events_parse_with_and_without_a_commit_id() {
        let mut body = Vec::new();
        body.extend_from_slice(&42u64.to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes());
        body.push(FL_GROUP_COMMIT_ID | FL_STANDALONE);
        body.extend_from_slice(&7u64.to_le_bytes());
        let event = GtidEvent::parse(&body, 9).unwrap();
        assert_eq!(event.gtid.to_string(), "3-9-42");
        assert!(event.is_standalone());
        assert!(
            GtidEvent::parse(&body[..body.len() - 1], 9).is_err(),
            "commit id cut short"
        );
        for cut in 0..13 {
            assert!(GtidEvent::parse(&body[..cut], 9).is_err());
        }
    }

    #[test]
    fn gtid_lists_parse_and_refuse_counts_the_body_cannot_hold() {
        let mut body = Vec::new();
        body.extend_from_slice(&(2u32 | 0x1000_0000).to_le_bytes());
        for (d, s, n) in [(0u32, 1u32, 100u64), (1, 2, 57)] {
            body.extend_from_slice(&d.to_le_bytes());
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(
            parse_gtid_list(&body).unwrap().to_string(),
            "0-1-100,1-2-57"
        );
        let mut huge = 0x0fff_ffffu32.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(parse_gtid_list(&huge).is_err());
    }
}

//! Decoder of the `pgoutput` logical replication protocol (version 1), the
//! payload of each `XLogData` message.
//!
//! Written by hand: the transport crate forwards these messages as raw bytes
//! and no maintained crate decodes them apart from a whole replication
//! client. Format: PostgreSQL docs, "Logical Replication Message Formats".
//! Every read is bounds-checked: arbitrary bytes give an error, never a
//! panic (see `fuzz/`).

use bytes::{Buf, Bytes};

use crate::source::txn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 UTC.
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(RelationMessage),
    Type {
        type_oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: TupleData,
    },
    Update {
        relation_id: u32,
        /// `K` (key columns) or `O` (whole old row, REPLICA IDENTITY FULL);
        /// absent when the update did not change the key.
        old: Option<(OldImage, TupleData)>,
        new: TupleData,
    },
    Delete {
        relation_id: u32,
        old: (OldImage, TupleData),
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relation_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A table's description, sent before its first change in a session and
/// again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationMessage {
    pub relation_id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Which old image an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldImage {
    /// `K`: replica identity columns only (others are sent as null).
    Key,
    /// `O`: the whole old row.
    Full,
}

/// One column value as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value: not sent.
    UnchangedToast,
    /// Text output of the type.
    Text(Bytes),
    /// Binary send format (only when `binary` was requested).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData(pub Vec<TupleValue>);

/// A message that does not follow the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message ({tag}): {problem}")]
pub struct DecodeError {
    pub tag: char,
    pub problem: String,
}

struct Reader {
    tag: char,
    buf: Bytes,
}

impl Reader {
    fn fail<T>(&self, problem: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            tag: self.tag,
            problem: problem.into(),
        })
    }

    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return self.fail(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.buf.remaining()
            ));
        }
        Ok(())
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }

    fn lsn(&mut self, what: &str) -> Result<Lsn, DecodeError> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated string.
    fn cstring(&mut self, what: &str) -> Result<String, DecodeError> {
        let Some(end) = self.buf.iter().position(|b| *b == 0) else {
            return self.fail(format!("{what} has no terminating NUL"));
        };
        let raw = self.buf.split_to(end);
        self.buf.advance(1);
        match String::from_utf8(raw.to_vec()) {
            Ok(text) => Ok(text),
            Err(_) => self.fail(format!("{what} is not UTF-8")),
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.i16("column count")?;
        if count < 0 {
            return self.fail(format!("negative column count {count}"));
        }
        // Each column takes at least one byte: refuse counts the buffer
        // cannot hold before allocating for them.
        self.need(count as usize, "column kinds")?;
        let mut values = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let value = match self.u8("column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    if len < 0 {
                        return self.fail(format!("negative value length {len}"));
                    }
                    let data = self.bytes(len as usize, "value")?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                other => return self.fail(format!("unknown column kind {other:#04x}")),
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    fn old_image(&mut self, kind: u8) -> Result<OldImage, DecodeError> {
        match kind {
            b'K' => Ok(OldImage::Key),
            b'O' => Ok(OldImage::Full),
            other => self.fail(format!("expected K or O, found {other:#04x}")),
        }
    }

    fn expect_new(&mut self, kind: u8) -> Result<(), DecodeError> {
        if kind != b'N' {
            return self.fail(format!("expected N (new tuple), found {kind:#04x}"));
        }
        Ok(())
    }

    fn finish<T>(&self, message: T) -> Result<T, DecodeError> {
        if self.buf.has_remaining() {
            return self.fail(format!("{} trailing bytes", self.buf.remaining()));
        }
        Ok(message)
    }
}

/// Decodes one pgoutput message (protocol version 1; streaming of
/// in-progress transactions is not requested, so no message carries an xid
/// prefix).
pub fn decode(data: Bytes) -> Result<LogicalMessage, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError {
            tag: '?',
            problem: "empty message".into(),
        });
    };
    let mut r = Reader {
        tag: tag as char,
        buf: data.slice(1..),
    };
    let message = match tag {
        b'B' => LogicalMessage::Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_ts: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        },
        b'C' => {
            let _flags = r.u8("flags")?;
            LogicalMessage::Commit {
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_ts: r.i64("commit timestamp")?,
            }
        }
        b'O' => LogicalMessage::Origin {
            commit_lsn: r.lsn("origin commit LSN")?,
            name: r.cstring("origin name")?,
        },
        b'R' => {
            let relation_id = r.u32("relation id")?;
            let namespace = r.cstring("namespace")?;
            let name = r.cstring("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.i16("column count")?;
            if count < 0 {
                return r.fail(format!("negative column count {count}"));
            }
            r.need(count as usize * 10, "columns")?;
            let mut columns = Vec::with_capacity(count as usize);
            for _ in 0..count {
                columns.push(RelationColumn {
                    is_key: r.u8("column flags")? & 1 == 1,
                    name: r.cstring("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            LogicalMessage::Relation(RelationMessage {
                relation_id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => LogicalMessage::Type {
            type_oid: r.u32("type oid")?,
            namespace: r.cstring("type namespace")?,
            name: r.cstring("type name")?,
        },
        b'I' => {
            let relation_id = r.u32("relation id")?;
            let kind = r.u8("tuple kind")?;
            r.expect_new(kind)?;
            LogicalMessage::Insert {
                relation_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let mut kind = r.u8("tuple kind")?;
            let old = if kind == b'K' || kind == b'O' {
                let image = r.old_image(kind)?;
                let tuple = r.tuple()?;
                kind = r.u8("tuple kind")?;
                Some((image, tuple))
            } else {
                None
            };
            r.expect_new(kind)?;
            LogicalMessage::Update {
                relation_id,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let kind = r.u8("tuple kind")?;
            let image = r.old_image(kind)?;
            LogicalMessage::Delete {
                relation_id,
                old: (image, r.tuple()?),
            }
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            r.need(count as usize * 4, "relation ids")?;
            let mut relation_ids = Vec::with_capacity(count as usize);
            for _ in 0..count {
                relation_ids.push(r.u32("relation id")?);
            }
            LogicalMessage::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstring("prefix")?;
            let len = r.u32("content length")?;
            LogicalMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len as usize, "content")?,
            }
        }
        other => {
            return Err(DecodeError {
                tag: other as char,
                problem: "unknown message type (streaming of in-progress transactions and two-phase commit are not requested)".into(),
            })
        }
    };
    r.finish(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn cstr(buf: &mut BytesMut, s: &str) {
        buf.put_slice(s.as_bytes());
        buf.put_u8(0);
    }

    fn text(buf: &mut BytesMut, s: &str) {
        buf.put_u8(b't');
        buf.put_i32(s.len() as i32);
        buf.put_slice(s.as_bytes());
    }

    #[test]
    fn decodes_a_relation_and_an_update_with_key_image_and_unchanged_toast() {
        let mut rel = BytesMut::new();
        rel.put_u8(b'R');
        rel.put_u32(16384);
        cstr(&mut rel, "public");
        cstr(&mut rel, "pos_order");
        rel.put_u8(b'd');
        rel.put_i16(2);
        rel.put_u8(1);
        cstr(&mut rel, "id");
        rel.put_u32(23);
        rel.put_i32(-1);
        rel.put_u8(0);
        cstr(&mut rel, "note");
        rel.put_u32(25);
        rel.put_i32(-1);
        let LogicalMessage::Relation(relation) = decode(rel.freeze()).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(relation.name, "pos_order");
        assert!(relation.columns[0].is_key && !relation.columns[1].is_key);

        let mut upd = BytesMut::new();
        upd.put_u8(b'U');
        upd.put_u32(16384);
        upd.put_u8(b'K');
        upd.put_i16(2);
        text(&mut upd, "7");
        upd.put_u8(b'n');
        upd.put_u8(b'N');
        upd.put_i16(2);
        text(&mut upd, "8");
        upd.put_u8(b'u');
        assert_eq!(
            decode(upd.freeze()).unwrap(),
            LogicalMessage::Update {
                relation_id: 16384,
                old: Some((
                    OldImage::Key,
                    TupleData(vec![
                        TupleValue::Text(Bytes::from_static(b"7")),
                        TupleValue::Null
                    ])
                )),
                new: TupleData(vec![
                    TupleValue::Text(Bytes::from_static(b"8")),
                    TupleValue::UnchangedToast
                ]),
            }
        );
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors_not_panics() {
        let mut ins = BytesMut::new();
        ins.put_u8(b'I');
        ins.put_u32(1);
        ins.put_u8(b'N');
        ins.put_i16(1);
        text(&mut ins, "hello");
        let full = ins.freeze();
        for cut in 0..full.len() {
            assert!(
                decode(full.slice(..cut)).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut longer = BytesMut::from(&full[..]);
        longer.put_u8(0);
        assert!(decode(longer.freeze())
            .unwrap_err()
            .problem
            .contains("trailing"));
        assert!(decode(full).is_ok());
    }

    /// A stable stand-in for the fuzz target (`fuzz/`), run on every test
    /// run: random bytes, and random mutations of valid messages, never
    /// panic.
    #[test]
    fn random_and_mutated_messages_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut valid = BytesMut::new();
        valid.put_u8(b'U');
        valid.put_u32(9);
        valid.put_u8(b'O');
        valid.put_i16(2);
        text(&mut valid, "old");
        valid.put_u8(b'u');
        valid.put_u8(b'N');
        valid.put_i16(2);
        text(&mut valid, "new");
        valid.put_u8(b'n');
        let valid = valid.freeze();
        for round in 0..100_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 64) as usize;
                let tags = b"BCORYIUDTMx";
                let mut random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if let Some(first) = random.first_mut() {
                    *first = tags[(next() % tags.len() as u64) as usize];
                }
                random
            } else {
                let mut mutated = valid.to_vec();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % mutated.len() as u64) as usize;
                    mutated[at] = next() as u8;
                }
                mutated.truncate((next() % (mutated.len() as u64 + 1)) as usize);
                mutated
            };
            let _ = decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut t = BytesMut::new();
        t.put_u8(b'T');
        t.put_u32(u32::MAX);
        t.put_u8(0);
        assert!(decode(t.freeze()).is_err());
        let mut i = BytesMut::new();
        i.put_u8(b'I');
        i.put_u32(1);
        i.put_u8(b'N');
        i.put_i16(i16::MAX);
        assert!(decode(i.freeze()).is_err());
    }
}

//! PostgreSQL text output → typed [`Value`], the same for streamed changes
//! and snapshot rows (both are read as text, with the session pinned to
//! `DateStyle=ISO`, `TimeZone=UTC`, `extra_float_digits=3`, see
//! [`SESSION_OPTIONS`]).
//!
//! A value whose text does not parse as its type (`infinity` timestamps,
//! `NaN` numerics, numbers beyond a decimal's 28 digits) is kept as
//! [`Value::Text`] with the server's text unchanged, so nothing is lost and
//! a mapping can still decide what to do with it.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rust_decimal::Decimal;

use crate::source::change::Value;

/// Startup options of every connection that reads values: text output in
/// one fixed form whatever the server's defaults.
pub const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO,MDY -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3";

/// Type OIDs with a typed form (`pg_type.oid`, fixed for built-in types).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Converts the text output of a value of type `type_oid`.
pub fn from_text(type_oid: u32, raw: &[u8]) -> Value {
    let text = match std::str::from_utf8(raw) {
        Ok(text) => text,
        // Server encoding is not UTF-8: keep the bytes rather than guess.
        Err(_) => return Value::Bytes(raw.to_vec()),
    };
    typed(type_oid, text).unwrap_or_else(|| Value::Text(text.to_owned()))
}

fn typed(type_oid: u32, text: &str) -> Option<Value> {
    Some(match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return None,
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Value::Int(text.parse().ok()?),
        oid::FLOAT4 | oid::FLOAT8 => Value::Float(text.parse().ok()?),
        oid::NUMERIC => Value::Numeric(Decimal::from_str_exact(text).ok()?),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => {
            Value::Text(text.to_owned())
        }
        oid::TIMESTAMP => {
            Value::Timestamp(NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?)
        }
        oid::TIMESTAMPTZ => Value::TimestampTz(
            DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .ok()?
                .with_timezone(&Utc),
        ),
        oid::DATE => Value::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?),
        oid::JSON | oid::JSONB => Value::Json(serde_json::from_str(text).ok()?),
        oid::UUID => Value::Uuid(uuid::Uuid::parse_str(text).ok()?),
        oid::BYTEA => Value::Bytes(decode_hex_bytea(text)?),
        _ => return None,
    })
}

/// `\x48656c6c6f` (bytea_output = hex, the default since 9.0).
fn decode_hex_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_types_become_typed_values() {
        assert_eq!(from_text(oid::BOOL, b"t"), Value::Bool(true));
        assert_eq!(from_text(oid::INT2, b"-32768"), Value::Int(-32768));
        assert_eq!(
            from_text(oid::INT8, b"9223372036854775807"),
            Value::Int(i64::MAX)
        );
        assert_eq!(
            from_text(oid::NUMERIC, b"1234.50"),
            Value::Numeric("1234.50".parse().unwrap())
        );
        assert_eq!(
            from_text(oid::VARCHAR, b"caf\xc3\xa9"),
            Value::Text("café".into())
        );
        assert_eq!(
            from_text(oid::TIMESTAMPTZ, b"2026-11-25 10:00:00.5+05:30"),
            Value::TimestampTz("2026-11-25T04:30:00.5Z".parse().unwrap())
        );
        assert_eq!(
            from_text(oid::TIMESTAMP, b"2026-11-25 10:00:00"),
            Value::Timestamp("2026-11-25T10:00:00".parse().unwrap())
        );
        assert_eq!(
            from_text(oid::DATE, b"2026-02-28"),
            Value::Date("2026-02-28".parse().unwrap())
        );
        assert_eq!(
            from_text(oid::JSONB, br#"{"a": [1]}"#),
            Value::Json(serde_json::json!({"a": [1]}))
        );
        assert_eq!(
            from_text(oid::BYTEA, b"\\x00ff"),
            Value::Bytes(vec![0, 255])
        );
    }

    #[test]
    fn values_without_a_typed_form_keep_their_text() {
        assert_eq!(from_text(oid::NUMERIC, b"NaN"), Value::Text("NaN".into()));
        assert_eq!(
            from_text(oid::TIMESTAMPTZ, b"infinity"),
            Value::Text("infinity".into())
        );
        assert_eq!(from_text(99999, b"gold"), Value::Text("gold".into()));
        assert_eq!(
            from_text(oid::NUMERIC, b"123456789012345678901234567890.5"),
            Value::Text("123456789012345678901234567890.5".into())
        );
    }
}

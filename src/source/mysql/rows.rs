//! Row images of MySQL/MariaDB row events, decoded by a plan built once per
//! TABLE_MAP event.
//!
//! Written by hand rather than using mysql_common's row decoder: that one
//! re-reads the table map's metadata for every value (≈ 3× slower on one
//! core) and sign-extends negative MEDIUMINT wrongly; it stays as the
//! cross-check in tests. The table map itself is parsed by mysql_common.
//! Formats: MySQL source, `log_event.cc` / `rows_event.cpp` and
//! `my_time.cc`, `decimal.c` (`decimal2bin`).
//!
//! Every read is bounds-checked: arbitrary bytes give an error, never a
//! panic.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use mysql_common::binlog::events::{OptionalMetadataField, TableMapEvent};
use rust_decimal::Decimal;

use crate::source::change::{Column, ReplicaIdentity, Row, Table, Value};

/// MySQL column type codes (`enum_field_types`).
mod ty {
    pub const DECIMAL: u8 = 0;
    pub const TINY: u8 = 1;
    pub const SHORT: u8 = 2;
    pub const LONG: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const DOUBLE: u8 = 5;
    pub const NULL: u8 = 6;
    pub const TIMESTAMP: u8 = 7;
    pub const LONGLONG: u8 = 8;
    pub const INT24: u8 = 9;
    pub const DATE: u8 = 10;
    pub const TIME: u8 = 11;
    pub const DATETIME: u8 = 12;
    pub const YEAR: u8 = 13;
    pub const NEWDATE: u8 = 14;
    pub const VARCHAR: u8 = 15;
    pub const BIT: u8 = 16;
    pub const TIMESTAMP2: u8 = 17;
    pub const DATETIME2: u8 = 18;
    pub const TIME2: u8 = 19;
    pub const JSON: u8 = 245;
    pub const NEWDECIMAL: u8 = 246;
    pub const ENUM: u8 = 247;
    pub const SET: u8 = 248;
    pub const TINY_BLOB: u8 = 249;
    pub const MEDIUM_BLOB: u8 = 250;
    pub const LONG_BLOB: u8 = 251;
    pub const BLOB: u8 = 252;
    pub const VAR_STRING: u8 = 253;
    pub const STRING: u8 = 254;
    pub const GEOMETRY: u8 = 255;
}

/// The binary collation: such a column's bytes are not text.
const BINARY_CHARSET: u16 = 63;

/// How one column's value is laid out in a row image.
#[derive(Debug, Clone, PartialEq)]
enum Codec {
    Int {
        bytes: usize,
        unsigned: bool,
    },
    Float,
    Double,
    Decimal {
        precision: usize,
        scale: usize,
    },
    Year,
    Date,
    /// DATETIME with fractional digits (MySQL 5.6+ format).
    DateTime2 {
        fsp: usize,
    },
    /// TIMESTAMP with fractional digits: seconds since the epoch, UTC.
    Timestamp2 {
        fsp: usize,
    },
    Time2 {
        fsp: usize,
    },
    /// VARCHAR, CHAR: a 1- or 2-byte length, then the bytes.
    Chars {
        length_bytes: usize,
        binary: bool,
    },
    /// TEXT, BLOB (and MariaDB's JSON, a LONGTEXT): a 1–4-byte length.
    Blob {
        length_bytes: usize,
        binary: bool,
    },
    Enum {
        bytes: usize,
        labels: Vec<String>,
    },
    Set {
        bytes: usize,
        labels: Vec<String>,
    },
    Bit {
        bytes: usize,
    },
}

/// A row image could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row event of `{table}`: {problem}")]
pub struct RowDecodeError {
    pub table: String,
    pub problem: String,
}

/// A table as a TABLE_MAP event describes it, with the plan to decode its
/// rows.
#[derive(Debug, Clone)]
pub struct TableLayout {
    pub table: Arc<Table>,
    codecs: Vec<Codec>,
}

/// Which images a rows event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    Write,
    Update,
    Delete,
}

struct Cursor<'a> {
    data: &'a [u8],
    table: &'a Table,
}

impl<'a> Cursor<'a> {
    fn fail<T>(&self, problem: impl Into<String>) -> Result<T, RowDecodeError> {
        Err(RowDecodeError {
            table: self.table.to_string(),
            problem: problem.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RowDecodeError> {
        if self.data.len() < n {
            return self.fail(format!(
                "truncated: needs {n} bytes, {} left",
                self.data.len()
            ));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn le(&mut self, n: usize) -> Result<u64, RowDecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn be(&mut self, n: usize) -> Result<u64, RowDecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

fn text_or_bytes(bytes: &[u8], binary: bool) -> Value {
    if binary {
        return Value::Bytes(bytes.to_vec());
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::Text(text.to_owned()),
        Err(_) => Value::Bytes(bytes.to_vec()),
    }
}

/// Bytes of a fractional-seconds part with `fsp` digits.
fn fsp_bytes(fsp: usize) -> usize {
    fsp.div_ceil(2)
}

/// Microseconds from a fractional part of `fsp` digits stored big-endian.
fn micros(cursor: &mut Cursor<'_>, fsp: usize) -> Result<u32, RowDecodeError> {
    let n = fsp_bytes(fsp);
    if n == 0 {
        return Ok(0);
    }
    let raw = cursor.be(n)? as u32;
    // 1 byte holds 2 digits, 2 bytes 4, 3 bytes 6.
    let micros = raw * 10u32.pow(6 - 2 * n as u32);
    if micros >= 1_000_000 {
        return cursor.fail(format!("fractional seconds {raw} out of range"));
    }
    Ok(micros)
}

/// Bytes that hold a DECIMAL digit group of 0–9 digits (`dig2bytes` in
/// MySQL's `decimal.c`).
const DIG2BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

/// `decimal2bin` inverted: groups of 9 digits in 4 bytes, a partial group
/// at each end, sign in the top bit, negatives stored inverted.
fn decode_decimal(
    cursor: &mut Cursor<'_>,
    precision: usize,
    scale: usize,
) -> Result<Value, RowDecodeError> {
    if scale > precision || precision > 65 {
        return cursor.fail(format!("DECIMAL({precision},{scale}) is not a valid type"));
    }
    let integer = precision - scale;
    let (int_full, int_rest) = (integer / 9, integer % 9);
    let (frac_full, frac_rest) = (scale / 9, scale % 9);
    let size = int_full * 4 + DIG2BYTES[int_rest] + frac_full * 4 + DIG2BYTES[frac_rest];
    let stored = cursor.take(size)?;
    // Most columns fit a decimal's 96-bit mantissa: build it from the digit
    // groups directly. Text, then parse, is the fallback for the rest (and
    // costs several allocations per value on every row).
    let shape = [int_rest, int_full, frac_full, frac_rest];
    if let Some(value) = decimal_from_groups(stored, shape, scale) {
        return Ok(Value::Numeric(value));
    }
    decimal_via_text(stored, cursor.table, shape, precision, scale)
}

/// A stored DECIMAL written out as text, then parsed: exact for any
/// precision (a value beyond a [`Decimal`] stays text).
fn decimal_via_text(
    stored: &[u8],
    table: &Table,
    shape: [usize; 4],
    precision: usize,
    scale: usize,
) -> Result<Value, RowDecodeError> {
    let [int_rest, int_full, frac_full, frac_rest] = shape;
    let mut bytes = stored.to_vec();
    let Some(first) = bytes.first_mut() else {
        return Ok(Value::Numeric(Decimal::ZERO));
    };
    let negative = *first & 0x80 == 0;
    *first ^= 0x80;
    if negative {
        bytes.iter_mut().for_each(|b| *b = !*b);
    }
    let mut digits = Cursor {
        data: &bytes,
        table,
    };
    let mut text = String::with_capacity(precision + 2);
    if negative {
        text.push('-');
    }
    let mut int_digits = String::new();
    if int_rest > 0 {
        int_digits.push_str(&digits.be(DIG2BYTES[int_rest])?.to_string());
    }
    for _ in 0..int_full {
        let group = digits.be(4)?;
        if int_digits.is_empty() {
            int_digits.push_str(&group.to_string());
        } else {
            int_digits.push_str(&format!("{group:09}"));
        }
    }
    let int_digits = int_digits.trim_start_matches('0');
    text.push_str(if int_digits.is_empty() {
        "0"
    } else {
        int_digits
    });
    if scale > 0 {
        text.push('.');
        for _ in 0..frac_full {
            text.push_str(&format!("{:09}", digits.be(4)?));
        }
        if frac_rest > 0 {
            let width = frac_rest;
            text.push_str(&format!("{:0width$}", digits.be(DIG2BYTES[frac_rest])?));
        }
    }
    Ok(match Decimal::from_str_exact(&text) {
        Ok(decimal) => Value::Numeric(decimal),
        // More than a decimal's 28 digits: keep the exact text.
        Err(_) => Value::Text(text),
    })
}

/// The value of a stored DECIMAL as a [`Decimal`], without going through
/// text; `None` when its digits do not fit (or a group is out of range, as
/// only a corrupt image has: the text path then reports what it reads).
/// `shape` is `[int_rest, int_full, frac_full, frac_rest]`: the digits of
/// the partial leading group, the full 9-digit integer groups, the full
/// fraction groups and the digits of the partial trailing group.
fn decimal_from_groups(stored: &[u8], shape: [usize; 4], scale: usize) -> Option<Decimal> {
    let [int_rest, int_full, frac_full, frac_rest] = shape;
    if scale > 28 {
        return None;
    }
    let first = *stored.first()?;
    let negative = first & 0x80 == 0;
    let flip = if negative { 0xff } else { 0 };
    let mut rest = stored;
    let mut mantissa: u128 = 0;
    let mut first_byte = true;
    let groups = [(int_rest, 1), (9, int_full), (9, frac_full), (frac_rest, 1)];
    for (digits, count) in groups {
        if digits == 0 {
            continue;
        }
        for _ in 0..count {
            let (bytes, tail) = rest.split_at_checked(DIG2BYTES[digits])?;
            rest = tail;
            let mut group: u64 = 0;
            for &byte in bytes {
                let mut byte = byte ^ flip;
                if first_byte {
                    // The sign bit, stored set for positive values.
                    byte ^= 0x80;
                    first_byte = false;
                }
                group = (group << 8) | u64::from(byte);
            }
            let limit = 10u64.pow(digits as u32);
            if group >= limit {
                return None;
            }
            mantissa = mantissa
                .checked_mul(u128::from(limit))?
                .checked_add(u128::from(group))?;
        }
    }
    let signed = i128::try_from(mantissa).ok()?;
    Decimal::try_from_i128_with_scale(if negative { -signed } else { signed }, scale as u32).ok()
}

impl Codec {
    fn decode(&self, cursor: &mut Cursor<'_>) -> Result<Value, RowDecodeError> {
        Ok(match self {
            Codec::Int { bytes, unsigned } => {
                let raw = cursor.le(*bytes)?;
                if *unsigned {
                    match i64::try_from(raw) {
                        Ok(value) => Value::Int(value),
                        // BIGINT UNSIGNED above i64: exact as a decimal.
                        Err(_) => Value::Numeric(Decimal::from(raw)),
                    }
                } else {
                    // Sign-extend from the column's width (MEDIUMINT is 3 bytes).
                    let shift = 64 - 8 * *bytes as u32;
                    Value::Int(((raw << shift) as i64) >> shift)
                }
            }
            Codec::Float => Value::Float(f64::from(f32::from_bits(cursor.le(4)? as u32))),
            Codec::Double => Value::Float(f64::from_bits(cursor.le(8)?)),
            Codec::Decimal { precision, scale } => decode_decimal(cursor, *precision, *scale)?,
            Codec::Year => {
                let year = cursor.le(1)?;
                if year == 0 {
                    Value::Int(0)
                } else {
                    Value::Int(1900 + year as i64)
                }
            }
            Codec::Date => {
                let raw = cursor.le(3)?;
                let (day, month, year) = (raw & 31, (raw >> 5) & 15, raw >> 9);
                match NaiveDate::from_ymd_opt(year as i32, month as u32, day as u32) {
                    Some(date) => Value::Date(date),
                    // Zero and partial dates ('0000-00-00') exist in MySQL.
                    None => Value::Text(format!("{year:04}-{month:02}-{day:02}")),
                }
            }
            Codec::DateTime2 { fsp } => {
                const DATETIMEF_INT_OFS: u64 = 0x80_0000_0000;
                let packed = cursor.be(5)?;
                let micros = micros(cursor, *fsp)?;
                let ymdhms = packed.wrapping_sub(DATETIMEF_INT_OFS);
                let ymd = ymdhms >> 17;
                let (year, month, day) = ((ymd >> 5) / 13, (ymd >> 5) % 13, ymd & 31);
                let hms = ymdhms & ((1 << 17) - 1);
                let (hour, minute, second) = (hms >> 12, (hms >> 6) & 63, hms & 63);
                match NaiveDate::from_ymd_opt(year as i32, month as u32, day as u32).and_then(
                    |date| {
                        date.and_hms_micro_opt(hour as u32, minute as u32, second as u32, micros)
                    },
                ) {
                    Some(datetime) => Value::Timestamp(datetime),
                    None => Value::Text(format!(
                        "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}"
                    )),
                }
            }
            Codec::Timestamp2 { fsp } => {
                let seconds = cursor.be(4)?;
                let micros = micros(cursor, *fsp)?;
                if seconds == 0 && micros == 0 {
                    Value::Text("0000-00-00 00:00:00".into())
                } else {
                    match DateTime::<Utc>::from_timestamp(seconds as i64, micros * 1000) {
                        Some(time) => Value::TimestampTz(time),
                        None => return cursor.fail(format!("TIMESTAMP {seconds} out of range")),
                    }
                }
            }
            Codec::Time2 { fsp } => {
                // `my_time_packed_from_binary`: hours (10 bits), minutes and
                // seconds (6 each) offset by 0x800000, then a fraction whose
                // width depends on fsp; negative times carry a negative
                // fraction. Packed: (hms << 24) + microseconds, signed.
                const TIMEF_INT_OFS: i64 = 0x80_0000;
                const TIMEF_OFS: i64 = 0x8000_0000_0000;
                let packed: i64 = match fsp_bytes(*fsp) {
                    0 => (cursor.be(3)? as i64 - TIMEF_INT_OFS) << 24,
                    1 => {
                        let mut int_part = cursor.be(3)? as i64 - TIMEF_INT_OFS;
                        let mut frac = cursor.be(1)? as i64;
                        if int_part < 0 && frac > 0 {
                            int_part += 1;
                            frac -= 0x100;
                        }
                        (int_part << 24) + frac * 10_000
                    }
                    2 => {
                        let mut int_part = cursor.be(3)? as i64 - TIMEF_INT_OFS;
                        let mut frac = cursor.be(2)? as i64;
                        if int_part < 0 && frac > 0 {
                            int_part += 1;
                            frac -= 0x10000;
                        }
                        (int_part << 24) + frac * 100
                    }
                    _ => cursor.be(6)? as i64 - TIMEF_OFS,
                };
                let negative = packed < 0;
                let packed = packed.abs();
                let (hms, micros) = (packed >> 24, packed % (1 << 24));
                let (hours, minutes, seconds) = ((hms >> 12) & 0x3ff, (hms >> 6) & 63, hms & 63);
                let sign = if negative { "-" } else { "" };
                let mut text = format!("{sign}{hours:02}:{minutes:02}:{seconds:02}");
                if *fsp > 0 {
                    let digits = format!("{micros:06}");
                    text.push('.');
                    text.push_str(&digits[..*fsp]);
                }
                Value::Text(text)
            }
            Codec::Chars {
                length_bytes,
                binary,
            } => {
                let len = cursor.le(*length_bytes)? as usize;
                text_or_bytes(cursor.take(len)?, *binary)
            }
            Codec::Blob {
                length_bytes,
                binary,
            } => {
                let len = cursor.le(*length_bytes)? as usize;
                text_or_bytes(cursor.take(len)?, *binary)
            }
            Codec::Enum { bytes, labels } => {
                let index = cursor.le(*bytes)? as usize;
                match index {
                    // The empty string MySQL stores for an invalid value.
                    0 => Value::Text(String::new()),
                    _ => match labels.get(index - 1) {
                        Some(label) => Value::Text(label.clone()),
                        None => Value::Int(index as i64),
                    },
                }
            }
            Codec::Set { bytes, labels } => {
                let bits = cursor.le(*bytes)?;
                if labels.is_empty() {
                    Value::Int(bits as i64)
                } else {
                    let chosen: Vec<&str> = labels
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i < 64 && bits & (1 << i) != 0)
                        .map(|(_, label)| label.as_str())
                        .collect();
                    Value::Text(chosen.join(","))
                }
            }
            Codec::Bit { bytes } => Value::Bytes(cursor.take(*bytes)?.to_vec()),
        })
    }
}

/// Optional metadata field types whose values start with a count of
/// labels per column (`SET_STR_VALUE`, `ENUM_STR_VALUE`).
const LABEL_FIELDS: [u8; 2] = [5, 6];

/// Reads a length-encoded integer (MySQL protocol), bounds-checked.
fn lenenc(data: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = data.split_first()?;
    let width = match first {
        0..=0xfa => {
            *data = rest;
            return Some(u64::from(first));
        }
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = rest.get(..width)?;
    *data = &rest[width..];
    Some(
        bytes
            .iter()
            .rev()
            .fold(0, |acc, b| (acc << 8) | u64::from(*b)),
    )
}

fn skip(data: &mut &[u8], n: u64) -> Option<()> {
    let n = usize::try_from(n).ok()?;
    *data = data.get(n..)?;
    Some(())
}

/// Refuses a TABLE_MAP body whose ENUM/SET label counts exceed the bytes
/// that would hold them. mysql_common allocates room for the count it reads
/// before reading the labels, so a corrupt count panics (capacity overflow)
/// or aborts the process (allocation failure) inside its parser — found by
/// our fuzz target. Walks the body as `log_event.cc` writes it: table id,
/// flags, names, column types, metadata, null bitmap, then the optional
/// metadata fields (type, length, value).
fn check_label_counts(mut body: &[u8]) -> Option<()> {
    skip(&mut body, 8)?;
    for _ in 0..2 {
        let name = u64::from(*body.first()?);
        skip(&mut body, 1 + name + 1)?;
    }
    let columns = lenenc(&mut body)?;
    skip(&mut body, columns)?;
    let metadata = lenenc(&mut body)?;
    skip(&mut body, metadata)?;
    skip(&mut body, columns.div_ceil(8))?;
    while let Some((&field_type, rest)) = body.split_first() {
        body = rest;
        let length = usize::try_from(lenenc(&mut body)?).ok()?;
        let mut value = body.get(..length)?;
        body = &body[length..];
        if LABEL_FIELDS.contains(&field_type) {
            while !value.is_empty() {
                let labels = lenenc(&mut value)?;
                // Every label takes at least its length byte.
                if labels > value.len() as u64 {
                    return None;
                }
                for _ in 0..labels {
                    let label = lenenc(&mut value)?;
                    skip(&mut value, label)?;
                }
            }
        }
    }
    Some(())
}

impl TableLayout {
    /// The layout a TABLE_MAP event describes; `body` is the event's raw
    /// body (after the header, without checksum), which `tme` was parsed
    /// from. Needs `binlog_row_metadata = FULL` for column names,
    /// signedness, ENUM/SET labels and the key; without it columns are
    /// named `@1`, `@2`, … and integers read signed.
    pub fn from_table_map(tme: &TableMapEvent<'_>, body: &[u8]) -> Result<Self, RowDecodeError> {
        let table_name = format!("{}.{}", tme.database_name(), tme.table_name());
        let fail = |problem: String| RowDecodeError {
            table: table_name.clone(),
            problem,
        };
        if check_label_counts(body).is_none() {
            return Err(fail(
                "the TABLE_MAP event is malformed (its ENUM/SET labels do not fit in it)".into(),
            ));
        }
        let count = tme.columns_count() as usize;
        let mut names: Vec<String> = Vec::new();
        let mut unsigned_flags: Vec<bool> = Vec::new();
        let mut enum_labels: Vec<Vec<String>> = Vec::new();
        let mut set_labels: Vec<Vec<String>> = Vec::new();
        let mut keys: Vec<usize> = Vec::new();
        let mut default_charset: Option<u16> = None;
        let mut non_default: Vec<(usize, u16)> = Vec::new();
        let mut column_charsets: Vec<u16> = Vec::new();
        for field in tme.iter_optional_meta() {
            let field = field.map_err(|e| fail(format!("optional metadata: {e}")))?;
            match field {
                OptionalMetadataField::ColumnName(column_names) => {
                    for name in column_names.iter_names() {
                        let name = name.map_err(|e| fail(format!("column names: {e}")))?;
                        names.push(name.name().into_owned());
                    }
                }
                OptionalMetadataField::Signedness(bits) => {
                    unsigned_flags = bits.iter().map(|bit| *bit).collect();
                }
                OptionalMetadataField::EnumStrValue(values) => {
                    for labels in values.iter_values() {
                        let labels = labels.map_err(|e| fail(format!("ENUM labels: {e}")))?;
                        enum_labels.push(
                            labels
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect(),
                        );
                    }
                }
                OptionalMetadataField::SetStrValue(values) => {
                    for labels in values.iter_values() {
                        let labels = labels.map_err(|e| fail(format!("SET labels: {e}")))?;
                        set_labels.push(
                            labels
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect(),
                        );
                    }
                }
                OptionalMetadataField::SimplePrimaryKey(key) => {
                    for index in key.iter_indexes() {
                        keys.push(index.map_err(|e| fail(format!("primary key: {e}")))? as usize);
                    }
                }
                OptionalMetadataField::PrimaryKeyWithPrefix(key) => {
                    for index in key.iter_keys() {
                        let index = index.map_err(|e| fail(format!("primary key: {e}")))?;
                        keys.push(index.column_index() as usize);
                    }
                }
                OptionalMetadataField::DefaultCharset(charsets) => {
                    default_charset = Some(charsets.default_charset());
                    for entry in charsets.iter_non_default() {
                        let entry = entry.map_err(|e| fail(format!("charsets: {e}")))?;
                        non_default.push((entry.column_index() as usize, entry.charset()));
                    }
                }
                OptionalMetadataField::ColumnCharset(charsets) => {
                    for charset in charsets.iter_charsets() {
                        column_charsets.push(charset.map_err(|e| fail(format!("charsets: {e}")))?);
                    }
                }
                _ => {}
            }
        }

        let mut codecs = Vec::with_capacity(count);
        let mut columns = Vec::with_capacity(count);
        let (mut numeric_index, mut enum_index, mut set_index, mut char_index) = (0, 0, 0, 0);
        for index in 0..count {
            let raw = tme
                .get_raw_column_type(index)
                .map_err(|e| fail(format!("column {index}: {e}")))?
                .ok_or_else(|| fail(format!("column {index} has no type")))?
                as u8;
            let meta = tme.get_column_metadata(index).unwrap_or(&[]);
            let meta_byte = |i: usize| meta.get(i).copied().unwrap_or(0) as usize;
            let mut charset_of_next_char_column = || {
                let charset = column_charsets
                    .get(char_index)
                    .copied()
                    .or_else(|| {
                        non_default
                            .iter()
                            .find(|(i, _)| *i == char_index)
                            .map(|(_, c)| *c)
                    })
                    .or(default_charset);
                char_index += 1;
                charset
            };
            let mut unsigned = || {
                let flag = unsigned_flags.get(numeric_index).copied().unwrap_or(false);
                numeric_index += 1;
                flag
            };
            let codec = match raw {
                ty::TINY => Codec::Int { bytes: 1, unsigned: unsigned() },
                ty::SHORT => Codec::Int { bytes: 2, unsigned: unsigned() },
                ty::INT24 => Codec::Int { bytes: 3, unsigned: unsigned() },
                ty::LONG => Codec::Int { bytes: 4, unsigned: unsigned() },
                ty::LONGLONG => Codec::Int { bytes: 8, unsigned: unsigned() },
                ty::FLOAT => {
                    unsigned();
                    Codec::Float
                }
                ty::DOUBLE => {
                    unsigned();
                    Codec::Double
                }
                ty::NEWDECIMAL => {
                    unsigned();
                    Codec::Decimal {
                        precision: meta_byte(0),
                        scale: meta_byte(1),
                    }
                }
                ty::YEAR => Codec::Year,
                ty::DATE | ty::NEWDATE => Codec::Date,
                ty::DATETIME2 => Codec::DateTime2 { fsp: meta_byte(0).min(6) },
                ty::TIMESTAMP2 => Codec::Timestamp2 { fsp: meta_byte(0).min(6) },
                ty::TIME2 => Codec::Time2 { fsp: meta_byte(0).min(6) },
                ty::VARCHAR | ty::VAR_STRING => {
                    let max = meta_byte(0) | (meta_byte(1) << 8);
                    Codec::Chars {
                        length_bytes: if max < 256 { 1 } else { 2 },
                        binary: charset_of_next_char_column() == Some(BINARY_CHARSET),
                    }
                }
                ty::BLOB | ty::TINY_BLOB | ty::MEDIUM_BLOB | ty::LONG_BLOB | ty::JSON | ty::GEOMETRY => {
                    let length_bytes = meta_byte(0);
                    if !(1..=4).contains(&length_bytes) {
                        return Err(fail(format!("column {index}: BLOB length size {length_bytes}")));
                    }
                    Codec::Blob {
                        length_bytes,
                        binary: raw == ty::GEOMETRY || charset_of_next_char_column() == Some(BINARY_CHARSET),
                    }
                }
                ty::STRING | ty::ENUM | ty::SET => {
                    // CHAR, ENUM and SET all travel as STRING; the first
                    // metadata byte holds the real type.
                    let (byte0, byte1) = (meta_byte(0), meta_byte(1));
                    let real = if byte0 & 0x30 != 0x30 { (byte0 | 0x30) as u8 } else { byte0 as u8 };
                    match real {
                        ty::ENUM => {
                            let labels = enum_labels.get(enum_index).cloned().unwrap_or_default();
                            enum_index += 1;
                            Codec::Enum { bytes: byte1.clamp(1, 2), labels }
                        }
                        ty::SET => {
                            let labels = set_labels.get(set_index).cloned().unwrap_or_default();
                            set_index += 1;
                            Codec::Set { bytes: byte1.clamp(1, 8), labels }
                        }
                        _ => {
                            let max = byte1 | (((byte0 & 0x30) ^ 0x30) << 4);
                            Codec::Chars {
                                length_bytes: if max < 256 { 1 } else { 2 },
                                binary: charset_of_next_char_column() == Some(BINARY_CHARSET),
                            }
                        }
                    }
                }
                ty::BIT => Codec::Bit {
                    bytes: (meta_byte(1) * 8 + meta_byte(0)).div_ceil(8),
                },
                ty::DECIMAL | ty::TIMESTAMP | ty::TIME | ty::DATETIME | ty::NULL => {
                    return Err(fail(format!(
                        "column {index} has the pre-5.6 type {raw}; run ALTER TABLE … FORCE on the source to rewrite it in the current format"
                    )))
                }
                other => return Err(fail(format!("column {index} has the unknown type {other}"))),
            };
            codecs.push(codec);
            columns.push(Column {
                name: names
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| format!("@{}", index + 1)),
                // Source type codes are MySQL's, not PostgreSQL OIDs.
                type_oid: u32::from(raw),
                is_key: keys.contains(&index),
            });
        }
        Ok(TableLayout {
            table: Arc::new(Table {
                schema: tme.database_name().into_owned(),
                name: tme.table_name().into_owned(),
                columns,
                // binlog_row_image = FULL: every image is the whole row.
                replica_identity: ReplicaIdentity::Full,
            }),
            codecs,
        })
    }

    /// Decodes every row of a rows event body: `(before, after)` per row.
    /// `present_*` are the event's column bitmaps (one flag per column).
    pub fn decode_rows(
        &self,
        kind: RowsKind,
        present_before: Option<&[bool]>,
        present_after: Option<&[bool]>,
        data: &[u8],
        mut emit: impl FnMut(Option<Row>, Option<Row>),
    ) -> Result<(), RowDecodeError> {
        let mut cursor = Cursor {
            data,
            table: &self.table,
        };
        let (wants_before, wants_after) = match kind {
            RowsKind::Write => (false, true),
            RowsKind::Update => (true, true),
            RowsKind::Delete => (true, false),
        };
        while !cursor.data.is_empty() {
            let unread = cursor.data.len();
            let before = if wants_before {
                Some(self.image(&mut cursor, present_before)?)
            } else {
                None
            };
            let after = if wants_after {
                Some(self.image(&mut cursor, present_after)?)
            } else {
                None
            };
            // A row that takes no bytes (no columns present) would never
            // reach the end of the data: found by the fuzz target.
            if cursor.data.len() == unread {
                return cursor.fail("a row image with no columns present");
            }
            emit(before, after);
        }
        Ok(())
    }

    fn image(
        &self,
        cursor: &mut Cursor<'_>,
        present: Option<&[bool]>,
    ) -> Result<Row, RowDecodeError> {
        let present = |i: usize| present.is_none_or(|p| p.get(i).copied().unwrap_or(false));
        let present_count = (0..self.codecs.len()).filter(|i| present(*i)).count();
        let nulls = cursor.take(present_count.div_ceil(8))?;
        let mut values = Vec::with_capacity(self.codecs.len());
        let mut present_index = 0;
        for (index, codec) in self.codecs.iter().enumerate() {
            if !present(index) {
                values.push(Value::Absent);
                continue;
            }
            let is_null = nulls[present_index / 8] & (1 << (present_index % 8)) != 0;
            present_index += 1;
            values.push(if is_null {
                Value::Null
            } else {
                codec.decode(cursor)?
            });
        }
        Ok(Row(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            schema: "s".into(),
            name: "t".into(),
            columns: vec![],
            replica_identity: ReplicaIdentity::Full,
        }
    }

    fn decimal(bytes: &[u8], precision: usize, scale: usize) -> Value {
        let table = table();
        let mut cursor = Cursor {
            data: bytes,
            table: &table,
        };
        decode_decimal(&mut cursor, precision, scale).unwrap()
    }

    #[test]
    fn decimals_decode_exactly_including_negatives() {
        // DECIMAL(20,4) 12345.6789 as MySQL writes it: 16 integer digits
        // (1 full group + 7 → 4 bytes), 4 fraction digits (2 bytes).
        let mut positive = vec![0x80, 0, 0, 0, 0, 0, 0x30, 0x39, 0x1a, 0x85];
        assert_eq!(
            decimal(&positive, 20, 4),
            Value::Numeric("12345.6789".parse().unwrap())
        );
        positive.iter_mut().for_each(|b| *b = !*b);
        assert_eq!(
            decimal(&positive, 20, 4),
            Value::Numeric("-12345.6789".parse().unwrap())
        );
        // DECIMAL(5,2) 0.05: 3 integer digits (2 bytes), 2 fraction (1 byte).
        assert_eq!(
            decimal(&[0x80, 0x00, 0x05], 5, 2),
            Value::Numeric("0.05".parse().unwrap())
        );
    }

    /// The direct path and the text path agree on every shape of column,
    /// for values of every length, both signs (random digit groups,
    /// written as `decimal2bin` writes them).
    #[test]
    fn decimals_built_from_groups_equal_the_text_path() {
        let table = table();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut direct = 0;
        for precision in 1..=65usize {
            for scale in 0..=precision.min(30) {
                for _ in 0..20 {
                    let integer = precision - scale;
                    let shape = [integer % 9, integer / 9, scale / 9, scale % 9];
                    let mut stored = Vec::new();
                    let groups = [(shape[0], 1), (9, shape[1]), (9, shape[2]), (shape[3], 1)];
                    // Short values too: most leading groups zero.
                    let zeros = random() % 4 == 0;
                    for (digits, count) in groups {
                        for _ in 0..if digits == 0 { 0 } else { count } {
                            let limit = 10u64.pow(digits as u32);
                            let value = if zeros && stored.len() < 4 {
                                0
                            } else {
                                random() % limit
                            };
                            let width = DIG2BYTES[digits];
                            stored.extend_from_slice(&value.to_be_bytes()[8 - width..]);
                        }
                    }
                    if stored.is_empty() {
                        continue;
                    }
                    stored[0] ^= 0x80;
                    if random() % 2 == 0 {
                        stored.iter_mut().for_each(|b| *b = !*b);
                    }
                    let text = decimal_via_text(&stored, &table, shape, precision, scale).unwrap();
                    if let Some(value) = decimal_from_groups(&stored, shape, scale) {
                        direct += 1;
                        assert_eq!(
                            Value::Numeric(value),
                            text,
                            "DECIMAL({precision},{scale}) {stored:02x?}"
                        );
                        let Value::Numeric(parsed) = text else {
                            unreachable!()
                        };
                        assert_eq!(value.scale(), parsed.scale());
                    } else {
                        // Only values beyond a decimal's mantissa or scale
                        // take the text path.
                        assert!(
                            scale > 28 || !matches!(text, Value::Numeric(d) if d.mantissa().abs() < (1i128 << 95)),
                            "DECIMAL({precision},{scale}) {stored:02x?} fell back to text: {text:?}"
                        );
                    }
                }
            }
        }
        assert!(direct > 10_000, "{direct}");
    }

    #[test]
    fn medium_ints_are_sign_extended() {
        let table = table();
        let codec = Codec::Int {
            bytes: 3,
            unsigned: false,
        };
        let mut cursor = Cursor {
            data: &[0xff, 0xff, 0xff],
            table: &table,
        };
        assert_eq!(codec.decode(&mut cursor).unwrap(), Value::Int(-1));
        let codec = Codec::Int {
            bytes: 8,
            unsigned: true,
        };
        let mut cursor = Cursor {
            data: &[0xff; 8],
            table: &table,
        };
        assert_eq!(
            codec.decode(&mut cursor).unwrap(),
            Value::Numeric(Decimal::from(u64::MAX))
        );
    }

    /// A stand-in for fuzzing on every test run: random row bytes through a
    /// layout of every codec never panic.
    #[test]
    fn random_row_bytes_never_panic() {
        let codecs = vec![
            Codec::Int {
                bytes: 3,
                unsigned: false,
            },
            Codec::Int {
                bytes: 8,
                unsigned: true,
            },
            Codec::Float,
            Codec::Double,
            Codec::Decimal {
                precision: 65,
                scale: 30,
            },
            Codec::Year,
            Codec::Date,
            Codec::DateTime2 { fsp: 6 },
            Codec::Timestamp2 { fsp: 3 },
            Codec::Time2 { fsp: 2 },
            Codec::Time2 { fsp: 5 },
            Codec::Chars {
                length_bytes: 2,
                binary: false,
            },
            Codec::Blob {
                length_bytes: 4,
                binary: true,
            },
            Codec::Enum {
                bytes: 2,
                labels: vec!["a".into()],
            },
            Codec::Set {
                bytes: 8,
                labels: vec!["x".into(), "y".into()],
            },
            Codec::Bit { bytes: 2 },
        ];
        let layout = TableLayout {
            table: Arc::new(table()),
            codecs,
        };
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            let len = (state % 96) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            for kind in [RowsKind::Write, RowsKind::Update, RowsKind::Delete] {
                let _ = layout.decode_rows(kind, None, None, &bytes, |_, _| {});
            }
        }
    }

    /// A TABLE_MAP body as MariaDB writes it with binlog_row_metadata =
    /// FULL: `shop.t (id BIGINT UNSIGNED, amount DECIMAL(20,4), name
    /// VARCHAR(100), at DATETIME(6), note BLOB)`.
    fn table_map_body() -> Vec<u8> {
        let mut body = vec![7, 0, 0, 0, 0, 0, 1, 0];
        body.extend_from_slice(b"\x04shop\0\x01t\0");
        body.push(5);
        body.extend_from_slice(&[
            ty::LONGLONG,
            ty::NEWDECIMAL,
            ty::VARCHAR,
            ty::DATETIME2,
            ty::BLOB,
        ]);
        let metadata = [20, 4, 100, 0, 6, 2];
        body.push(metadata.len() as u8);
        body.extend_from_slice(&metadata);
        body.push(0b0001_1110); // nullable: all but id
                                // SIGNEDNESS: one bit per numeric column, most significant first.
        body.extend_from_slice(&[1, 1, 0b1000_0000]);
        // DEFAULT_CHARSET: utf8mb4_general_ci.
        body.extend_from_slice(&[2, 1, 45]);
        let mut names = Vec::new();
        for name in ["id", "amount", "name", "at", "note"] {
            names.push(name.len() as u8);
            names.extend_from_slice(name.as_bytes());
        }
        body.extend_from_slice(&[4, names.len() as u8]);
        body.extend_from_slice(&names);
        body
    }

    /// Parses a TABLE_MAP body as mysql_common does for the reader; the
    /// format description only tells it the table id's width.
    fn parse_table_map(body: &[u8]) -> std::io::Result<TableLayout> {
        use mysql_common::binlog::consts::BinlogVersion;
        use mysql_common::binlog::events::FormatDescriptionEvent;
        use mysql_common::binlog::BinlogCtx;
        use mysql_common::io::ParseBuf;
        use mysql_common::proto::MyDeserialize;
        let fde = FormatDescriptionEvent::new(BinlogVersion::Version4);
        let table_map =
            TableMapEvent::deserialize(BinlogCtx::new(body.len(), &fde, 19), &mut ParseBuf(body))?;
        TableLayout::from_table_map(&table_map, body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.problem))
    }

    #[test]
    fn a_table_map_with_full_metadata_plans_a_row_decode() {
        let body = table_map_body();
        let layout = parse_table_map(&body).unwrap();
        let names: Vec<&str> = layout
            .table
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["id", "amount", "name", "at", "note"]);
        let mut row = vec![0b0001_0000]; // note is NULL
        row.extend_from_slice(&u64::MAX.to_le_bytes());
        row.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0x30, 0x39, 0x1a, 0x85]);
        row.extend_from_slice(b"\x03abc");
        let (ym, day, hour) = (2026u64 * 13 + 11, 25u64, 10u64);
        let packed = (((ym << 5) | day) << 17 | (hour << 12)) + 0x80_0000_0000;
        row.extend_from_slice(&packed.to_be_bytes()[3..]);
        row.extend_from_slice(&123_456u32.to_be_bytes()[1..]);
        let mut rows = Vec::new();
        layout
            .decode_rows(RowsKind::Write, None, None, &row, |before, after| {
                rows.push((before, after))
            })
            .unwrap();
        let at = NaiveDate::from_ymd_opt(2026, 11, 25)
            .unwrap()
            .and_hms_micro_opt(10, 0, 0, 123_456)
            .unwrap();
        assert_eq!(
            rows,
            [(
                None,
                Some(Row(vec![
                    Value::Numeric(Decimal::from(u64::MAX)),
                    Value::Numeric("12345.6789".parse().unwrap()),
                    Value::Text("abc".into()),
                    Value::Timestamp(at),
                    Value::Null,
                ]))
            )]
        );
    }

    #[test]
    fn a_table_map_claiming_more_labels_than_it_holds_is_refused() {
        let mut body = table_map_body();
        // ENUM_STR_VALUE: one column claiming 2^56 labels in 9 bytes.
        body.extend_from_slice(&[6, 9, 0xfe, 0, 0, 0, 0, 0, 0, 0, 1]);
        let error = parse_table_map(&body).unwrap_err();
        assert!(error.to_string().contains("ENUM/SET labels"), "{error}");
        assert!(check_label_counts(&table_map_body()).is_some());
    }

    #[test]
    fn a_row_of_no_columns_is_an_error_not_an_endless_loop() {
        let layout = TableLayout {
            table: Arc::new(table()),
            codecs: vec![Codec::Year],
        };
        let result =
            layout.decode_rows(RowsKind::Write, None, Some(&[false]), &[1, 2, 3], |_, _| {});
        assert!(result.unwrap_err().problem.contains("no columns present"));
    }

    /// A stand-in for fuzzing table maps on every test run: a real body cut
    /// short and with bytes overwritten never panics, in parsing or in
    /// decoding rows with whatever plan results.
    #[test]
    fn mutated_table_maps_never_panic() {
        let body = table_map_body();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut planned = 0;
        for _ in 0..20_000 {
            let mut mutated = body.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % mutated.len();
                mutated[at] = next() as u8;
            }
            if next() % 4 == 0 {
                mutated.truncate((next() as usize) % (body.len() + 1));
            }
            let rows: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            if let Ok(layout) = parse_table_map(&mutated) {
                planned += 1;
                for kind in [RowsKind::Write, RowsKind::Update, RowsKind::Delete] {
                    let _ = layout.decode_rows(kind, None, None, &rows, |_, _| {});
                }
            }
        }
        assert!(
            planned > 1_000,
            "mutations too destructive to reach the row decoder: {planned}"
        );
    }
}

//! Expressions in mappings: CEL (Common Expression Language, the `cel`
//! crate), evaluated over one source row and what is joined to it.
//!
//! Variables an expression sees: `row` (the new row image, or the old one
//! for a delete), `before` (the old image, or null), `lines` (a document's
//! child rows from the same source transaction, a list of maps) and one map
//! per join, named after it. Columns are map keys: `row.state`,
//! `store.code`. Decimal columns arrive as doubles, which is fine for
//! conditions; amounts are never computed in CEL but summed exactly from
//! columns (see [`super::mapping::Amount`]).

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::types::{CelMap, CelMapKey, CelNull};
use cel::common::value::Val;
use cel::objects::{Key, Map};
use cel::{Context, Program, Value as Cel};

use crate::source::change::Value;

/// A compiled expression and the text it came from (for messages).
pub struct Expr {
    text: String,
    program: Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.text)
    }
}

/// Evaluation failed: the message names the expression, never row values.
#[derive(Debug, thiserror::Error)]
#[error("expression `{expression}`: {problem}")]
pub struct EvalError {
    pub expression: String,
    pub problem: String,
}

impl Expr {
    pub fn compile(text: &str) -> Result<Self, String> {
        let program =
            Program::compile(text).map_err(|e| format!("not a valid CEL expression: {e}"))?;
        Ok(Self {
            text: text.to_string(),
            program,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Column names this expression reads from `variable` (`row.x` → `x`),
    /// so `check` can name a column the live table lacks. A scan of the
    /// text, not of the syntax tree: `row.x` inside a string literal counts
    /// too, which errs on the side of checking.
    pub fn columns_of(&self, variable: &str) -> Vec<String> {
        let prefix = format!("{variable}.");
        let bytes = self.text.as_bytes();
        let mut found = Vec::new();
        let mut start = 0;
        while let Some(at) = self.text[start..].find(&prefix) {
            let at = start + at;
            let preceded_by_ident = at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b'.');
            let name_start = at + prefix.len();
            let name_end = self.text[name_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(self.text.len(), |n| name_start + n);
            if !preceded_by_ident && name_end > name_start {
                found.push(self.text[name_start..name_end].to_string());
            }
            start = name_end.max(at + 1);
        }
        found
    }

    fn eval(&self, scope: &Scope) -> Result<Cel, EvalError> {
        self.program
            .execute(&scope.context())
            .map_err(|e| EvalError {
                expression: self.text.clone(),
                problem: e.to_string(),
            })
    }

    /// A condition: must give a bool.
    pub fn test(&self, scope: &Scope) -> Result<bool, EvalError> {
        match self.eval(scope)? {
            Cel::Bool(b) => Ok(b),
            other => Err(self.wrong_type("a bool (true/false)", &other)),
        }
    }

    /// A flag: a bool, or null for "not stated". Numbers 0/1 (MySQL
    /// TINYINT(1)) count as false/true.
    pub fn bool_value(&self, scope: &Scope) -> Result<Option<bool>, EvalError> {
        match self.eval(scope)? {
            Cel::Null => Ok(None),
            Cel::Bool(b) => Ok(Some(b)),
            Cel::Int(0) | Cel::UInt(0) => Ok(Some(false)),
            Cel::Int(1) | Cel::UInt(1) => Ok(Some(true)),
            other => Err(self.wrong_type("a bool, 0/1 or null", &other)),
        }
    }

    /// A text-valued field: strings as they are, numbers in decimal, null
    /// as `None`.
    pub fn text_value(&self, scope: &Scope) -> Result<Option<String>, EvalError> {
        match self.eval(scope)? {
            Cel::Null => Ok(None),
            Cel::String(s) => Ok(Some(s.to_string())),
            Cel::Int(i) => Ok(Some(i.to_string())),
            Cel::UInt(u) => Ok(Some(u.to_string())),
            Cel::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(Some(format!("{f:.0}"))),
            Cel::Bool(b) => Ok(Some(b.to_string())),
            other => Err(self.wrong_type("text, a number or null", &other)),
        }
    }

    fn wrong_type(&self, wanted: &str, got: &Cel) -> EvalError {
        EvalError {
            expression: self.text.clone(),
            problem: format!("gives {}, not {wanted}", type_name(got)),
        }
    }
}

fn type_name(value: &Cel) -> &'static str {
    match value {
        Cel::List(_) => "a list",
        Cel::Map(_) => "a map",
        Cel::Int(_) | Cel::UInt(_) => "an integer",
        Cel::Float(_) => "a double",
        Cel::String(_) => "a string",
        Cel::Bytes(_) => "bytes",
        Cel::Bool(_) => "a bool",
        Cel::Null => "null",
        _ => "a value of another type",
    }
}

/// The variables one evaluation sees, handed to CEL as they are set.
///
/// Handing a variable to CEL converts it (a row of 40 columns is 40
/// conversions), so every expression evaluated against the same variables
/// reuses the one context; setting a variable adds just that one.
pub struct Scope {
    context: std::sync::Mutex<Context<'static, 'static>>,
}

impl Default for Scope {
    fn default() -> Self {
        // The standard library's declarations are built once: building
        // them per evaluation (what `Context::default()` does) was most of
        // the time spent normalizing an order.
        static STDLIB: std::sync::OnceLock<Arc<cel::Env>> = std::sync::OnceLock::new();
        let env = STDLIB.get_or_init(|| Arc::new(cel::Env::stdlib()));
        Self {
            context: std::sync::Mutex::new(Context::with_env(Arc::clone(env))),
        }
    }
}

impl Scope {
    fn context(&self) -> std::sync::MutexGuard<'_, Context<'static, 'static>> {
        self.context.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or replaces) a variable.
    pub fn set(&mut self, name: &str, value: Cel) {
        self.context_mut()
            .add_variable_from_value(name.to_string(), value);
    }

    /// Sets a variable built as CEL's own value ([`row_val`], [`json_val`]):
    /// no conversion at all.
    pub fn set_val(&mut self, name: &str, value: Box<dyn Val>) {
        self.context_mut()
            .add_variable_as_val(name.to_string(), value);
    }

    fn context_mut(&mut self) -> &mut Context<'static, 'static> {
        self.context.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

/// A column value as CEL's own value: what [`cel_value`] gives, converted.
fn val_of(value: Cel) -> Box<dyn Val> {
    // Every value `cel_value` and `json_value` make converts; were one not
    // to, null is what an absent column reads as anyway.
    Box::<dyn Val>::try_from(value).unwrap_or_else(|_| Box::new(CelNull))
}

/// A row as CEL's own map, keeping only `only`'s columns when given. Built
/// directly: a [`Cel::Map`] handed to a context is copied entry by entry
/// into such a map, which cost a quarter of normalizing an order.
pub fn row_val(
    columns: &[crate::source::Column],
    values: &[Value],
    only: Option<&std::collections::HashSet<String>>,
) -> Box<dyn Val> {
    let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = columns
        .iter()
        .zip(values)
        .filter(|(column, _)| only.is_none_or(|only| only.contains(&column.name)))
        .map(|(column, value)| {
            (
                CelMapKey::from(column.name.clone()),
                val_of(cel_value(value)),
            )
        })
        .collect();
    Box::new(CelMap::from(map))
}

/// A stored reference row (plain JSON object) as CEL's own map; `columns`
/// are always present, null when the row is unknown.
pub fn json_val(
    columns: &[String],
    row: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Box<dyn Val> {
    let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = columns
        .iter()
        .map(|column| {
            let value = row
                .and_then(|r| r.get(column))
                .map_or(Cel::Null, json_value);
            (CelMapKey::from(column.clone()), val_of(value))
        })
        .collect();
    Box::new(CelMap::from(map))
}

/// A row as a CEL map from column name to value (a document's lines, as
/// the list `lines`).
pub fn row_map(columns: &[crate::source::Column], values: &[Value]) -> Cel {
    let map: HashMap<Key, Cel> = columns
        .iter()
        .zip(values)
        .map(|(column, value)| (Key::String(Arc::new(column.name.clone())), cel_value(value)))
        .collect();
    Cel::Map(Map { map: Arc::new(map) })
}

impl Expr {
    /// Whether the expression uses `variable` other than as `variable.col`
    /// (then every column must be handed over).
    pub fn uses_whole(&self, variable: &str) -> bool {
        let bytes = self.text.as_bytes();
        let mut start = 0;
        while let Some(at) = self.text[start..].find(variable) {
            let at = start + at;
            let end = at + variable.len();
            let before_ok = at == 0
                || !(bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b'.');
            let after_ident = bytes
                .get(end)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
            if before_ok && !after_ident && bytes.get(end) != Some(&b'.') {
                return true;
            }
            start = end;
        }
        false
    }
}

/// A map of named values (features), for CEL.
pub fn named_map(entries: Vec<(&str, Cel)>) -> Cel {
    let map: HashMap<Key, Cel> = entries
        .into_iter()
        .map(|(name, value)| (Key::String(Arc::new(name.to_string())), value))
        .collect();
    Cel::Map(Map { map: Arc::new(map) })
}

pub fn list(items: Vec<Cel>) -> Cel {
    Cel::List(Arc::new(items))
}

pub fn json_value(value: &serde_json::Value) -> Cel {
    match value {
        serde_json::Value::Null => Cel::Null,
        serde_json::Value::Bool(b) => Cel::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Cel::Int)
            .or_else(|| n.as_f64().map(Cel::Float))
            .unwrap_or(Cel::Null),
        serde_json::Value::String(s) => Cel::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => list(items.iter().map(json_value).collect()),
        serde_json::Value::Object(fields) => {
            let map: HashMap<Key, Cel> = fields
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), json_value(v)))
                .collect();
            Cel::Map(Map { map: Arc::new(map) })
        }
    }
}

/// A column value as CEL sees it.
pub fn cel_value(value: &Value) -> Cel {
    match value {
        // An unchanged TOAST value is unknown here; the mappings never need
        // one (large text is not what orders are judged by).
        Value::Null | Value::UnchangedToast | Value::Absent => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Int(i) => Cel::Int(*i),
        Value::Float(f) => Cel::Float(*f),
        Value::Numeric(d) => {
            use rust_decimal::prelude::ToPrimitive;
            // Whole numbers stay integers, so `row.state == 2` holds for a
            // DECIMAL or an unsigned BIGINT read as a decimal.
            if d.fract().is_zero() {
                if let Some(i) = d.to_i64() {
                    return Cel::Int(i);
                }
            }
            d.to_f64().map_or(Cel::Null, Cel::Float)
        }
        Value::Text(s) => Cel::String(Arc::new(s.clone())),
        Value::Timestamp(t) => Cel::String(Arc::new(t.and_utc().to_rfc3339())),
        Value::TimestampTz(t) => Cel::String(Arc::new(t.to_rfc3339())),
        Value::Date(d) => Cel::String(Arc::new(d.to_string())),
        Value::Json(j) => json_value(j),
        Value::Uuid(u) => Cel::String(Arc::new(u.to_string())),
        Value::Bytes(b) => Cel::Bytes(Arc::new(b.clone())),
    }
}

/// A column value as plain JSON, for stored reference rows and quarantine.
pub fn plain_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Null | Value::UnchangedToast | Value::Absent => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => J::from(*f),
        Value::Numeric(d) => J::String(d.to_string()),
        Value::Text(s) => J::String(s.clone()),
        Value::Timestamp(t) => J::String(t.and_utc().to_rfc3339()),
        Value::TimestampTz(t) => J::String(t.to_rfc3339()),
        Value::Date(d) => J::String(d.to_string()),
        Value::Json(j) => j.clone(),
        Value::Uuid(u) => J::String(u.to_string()),
        Value::Bytes(b) => J::String(b.iter().map(|x| format!("{x:02x}")).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_read_from_a_variable_are_found_in_the_text() {
        let expr =
            Expr::compile("row.state in ['paid'] && !row.is_refund && store.row_x == 1").unwrap();
        assert_eq!(expr.columns_of("row"), ["state", "is_refund"]);
        assert_eq!(expr.columns_of("store"), ["row_x"]);
    }

    #[test]
    fn whole_decimals_compare_as_integers_and_null_fields_are_none() {
        let mut scope = Scope::default();
        let columns = vec![
            crate::source::Column {
                name: "state".into(),
                type_oid: 0,
                is_key: false,
            },
            crate::source::Column {
                name: "email".into(),
                type_oid: 0,
                is_key: false,
            },
        ];
        scope.set(
            "row",
            row_map(&columns, &[Value::Numeric(2.into()), Value::Null]),
        );
        assert!(Expr::compile("row.state == 2")
            .unwrap()
            .test(&scope)
            .unwrap());
        assert_eq!(
            Expr::compile("row.email")
                .unwrap()
                .text_value(&scope)
                .unwrap(),
            None
        );
        let error = Expr::compile("row.state")
            .unwrap()
            .test(&scope)
            .unwrap_err();
        assert!(error.to_string().contains("not a bool"), "{error}");
    }
}

#[cfg(test)]
mod whole_use_tests {
    use super::*;

    #[test]
    fn a_variable_used_whole_is_told_from_its_columns() {
        assert!(!Expr::compile("row.state == 'paid' && row.id > 0")
            .unwrap()
            .uses_whole("row"));
        assert!(Expr::compile("has(row.state) && size(row) > 2")
            .unwrap()
            .uses_whole("row"));
        assert!(Expr::compile("row['state'] == 'x'")
            .unwrap()
            .uses_whole("row"));
        assert!(!Expr::compile("arrow.x == 1 && rows.y")
            .unwrap()
            .uses_whole("row"));
    }
}

//! Request validation with the rules of the original service's zod schemas.
//!
//! Failures are collected per field and answered as zod's `flatten()` shape,
//! `{"formErrors": [...], "fieldErrors": {"<field>": ["<message>"]}}`: as in zod, a
//! failure inside a nested value (`policy.timeout_sec`, `context_hints[1]`) is filed
//! under its top-level field (`policy`, `context_hints`), and every failed check of a
//! value is reported. Unknown fields are ignored, as zod strips them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// Postgres text cannot hold NUL characters: they are refused up front.
const NUL_MESSAGE: &str = "String must not contain NUL (\\u0000) characters";

/// Collected validation failures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FieldErrors {
    #[serde(rename = "formErrors")]
    pub form: Vec<String>,
    #[serde(rename = "fieldErrors")]
    pub fields: BTreeMap<String, Vec<String>>,
}

impl FieldErrors {
    /// Records a failure of `field`.
    pub fn add(&mut self, field: &str, msg: impl Into<String>) {
        self.fields.entry(field.to_owned()).or_default().push(msg.into());
    }

    /// `Ok(value)` when nothing failed (a 400 once it reaches a handler's answer).
    pub fn finish<T>(self, value: T) -> Result<T, FieldErrors> {
        if self.form.is_empty() && self.fields.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// An optional text query parameter: absent and empty are the same (no filter).
pub fn query_text(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.is_empty())
}

/// An optional integer query parameter in `min..=max` (absent or empty: `None`); a
/// malformed one is filed under its name.
pub fn query_int(errors: &mut FieldErrors, name: &str, v: &Option<String>, min: i64, max: i64) -> Option<i64> {
    match v.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                errors.add(name, format!("Expected an integer from {min} to {max}, received '{s}'"));
                None
            }
        },
    }
}

/// The time range `[from, to)` of query parameters `from` and `to` (epoch ms): `to`
/// defaults to `now`, `from` to `default_ms` before `to`; `from` after `to` is filed
/// under `from`.
pub fn query_range(
    errors: &mut FieldErrors,
    from: &Option<String>,
    to: &Option<String>,
    now: i64,
    default_ms: i64,
) -> (i64, i64) {
    let to = query_int(errors, "to", to, 0, i64::MAX).unwrap_or(now);
    let from = query_int(errors, "from", from, 0, i64::MAX).unwrap_or(to.saturating_sub(default_ms));
    if from > to {
        errors.add("from", "from must not be after to");
    }
    (from, to)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Reads fields of one JSON object, recording failures under the top-level field they
/// belong to.
pub struct Fields<'a> {
    obj: Option<&'a Map<String, Value>>,
    /// The top-level field this object is (empty for the body itself).
    top: String,
    pub errors: &'a mut FieldErrors,
}

impl<'a> Fields<'a> {
    /// The request body; a non-object body is a form error.
    pub fn root(body: &'a Value, errors: &'a mut FieldErrors) -> Fields<'a> {
        let obj = match body {
            Value::Object(m) => Some(m),
            other => {
                errors.form.push(format!("Expected object, received {}", type_name(other)));
                None
            }
        };
        Fields { obj, top: String::new(), errors }
    }

    /// The field a failure of `key` is filed under.
    fn field(&self, key: &str) -> String {
        if self.top.is_empty() {
            key.to_owned()
        } else {
            self.top.clone()
        }
    }

    /// The raw value of `key`; `None` when absent (or when the body is not an object).
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(key))
    }

    fn fail(&mut self, key: &str, msg: impl Into<String>) {
        let field = self.field(key);
        self.errors.add(&field, msg);
    }

    fn required(&mut self, key: &str) -> Option<&'a Value> {
        let v = self.raw(key);
        if v.is_none() && self.obj.is_some() {
            self.fail(key, "Required");
        }
        v
    }

    /// A required string of `min..=max` characters.
    pub fn string(&mut self, key: &str, min: usize, max: Option<usize>) -> Option<String> {
        let v = self.required(key)?;
        self.check_string(key, v, min, max)
    }

    /// An optional string (absent or, when `nullable`, null → `None`).
    pub fn opt_string(&mut self, key: &str, min: usize, max: Option<usize>, nullable: bool) -> Option<Option<String>> {
        match self.raw(key) {
            None => Some(None),
            Some(Value::Null) if nullable => Some(None),
            Some(v) => self.check_string(key, v, min, max).map(Some),
        }
    }

    fn check_string(&mut self, key: &str, v: &Value, min: usize, max: Option<usize>) -> Option<String> {
        let Value::String(s) = v else {
            self.fail(key, format!("Expected string, received {}", type_name(v)));
            return None;
        };
        if s.contains('\0') {
            self.fail(key, NUL_MESSAGE);
            return None;
        }
        // Lengths in UTF-16 code units, as JavaScript counts them.
        let len = s.encode_utf16().count();
        if len < min {
            self.fail(key, format!("String must contain at least {min} character(s)"));
            return None;
        }
        if let Some(max) = max {
            if len > max {
                self.fail(key, format!("String must contain at most {max} character(s)"));
                return None;
            }
        }
        Some(s.clone())
    }

    /// An optional integer in `min..=max`, `default` when absent.
    pub fn int(&mut self, key: &str, min: i64, max: i64, default: Option<i64>) -> Option<i64> {
        let v = match (self.raw(key), default) {
            (None, Some(d)) => return Some(d),
            (None, None) => return self.required(key).and(None),
            (Some(v), _) => v,
        };
        let Some(n) = v.as_f64() else {
            self.fail(key, format!("Expected number, received {}", type_name(v)));
            return None;
        };
        // Every check runs, as zod's do.
        let mut ok = true;
        if n.fract() != 0.0 || !n.is_finite() {
            self.fail(key, "Expected integer, received float");
            ok = false;
        }
        if n < min as f64 {
            self.fail(key, format!("Number must be greater than or equal to {min}"));
            ok = false;
        }
        if n > max as f64 {
            self.fail(key, format!("Number must be less than or equal to {max}"));
            ok = false;
        }
        ok.then_some(n as i64)
    }

    /// An optional integer in `min..=max` (absent or null → `None` inside).
    pub fn opt_int(&mut self, key: &str, min: i64, max: i64) -> Option<Option<i64>> {
        match self.raw(key) {
            None | Some(Value::Null) => Some(None),
            Some(_) => self.int(key, min, max, None).map(Some),
        }
    }

    /// An optional number `>= min`, `default` when absent.
    pub fn number(&mut self, key: &str, min: f64, default: f64) -> Option<f64> {
        let Some(v) = self.raw(key) else {
            return Some(default);
        };
        match v.as_f64() {
            Some(n) if n >= min => Some(n),
            Some(_) => {
                self.fail(key, format!("Number must be greater than or equal to {min}"));
                None
            }
            None => {
                self.fail(key, format!("Expected number, received {}", type_name(v)));
                None
            }
        }
    }

    /// A required number in `min..=max`.
    pub fn number_in(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        let v = self.required(key)?;
        let Some(n) = v.as_f64() else {
            self.fail(key, format!("Expected number, received {}", type_name(v)));
            return None;
        };
        if n < min {
            self.fail(key, format!("Number must be greater than or equal to {min}"));
            return None;
        }
        if n > max {
            self.fail(key, format!("Number must be less than or equal to {max}"));
            return None;
        }
        Some(n)
    }

    /// An optional number in `min..=max` (absent or null → `None` inside).
    pub fn opt_number_in(&mut self, key: &str, min: f64, max: f64) -> Option<Option<f64>> {
        match self.raw(key) {
            None | Some(Value::Null) => Some(None),
            Some(_) => self.number_in(key, min, max).map(Some),
        }
    }

    /// An optional boolean, `default` when absent.
    pub fn boolean(&mut self, key: &str, default: bool) -> Option<bool> {
        match self.raw(key) {
            None => Some(default),
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                self.fail(key, format!("Expected boolean, received {}", type_name(v)));
                None
            }
        }
    }

    /// An optional array of strings (`None` inside when absent).
    pub fn opt_strings(&mut self, key: &str) -> Option<Option<Vec<String>>> {
        let Some(v) = self.raw(key) else {
            return Some(None);
        };
        let Value::Array(items) = v else {
            self.fail(key, format!("Expected array, received {}", type_name(v)));
            return None;
        };
        // One failure per bad element, as zod reports them.
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match item {
                Value::String(s) if s.contains('\0') => {
                    self.fail(key, NUL_MESSAGE);
                    ok = false;
                }
                Value::String(s) => out.push(s.clone()),
                other => {
                    self.fail(key, format!("Expected string, received {}", type_name(other)));
                    ok = false;
                }
            }
        }
        ok.then_some(Some(out))
    }

    /// An optional enum value among `allowed`, `default` when absent.
    pub fn one_of(
        &mut self,
        key: &str,
        allowed: &[&'static str],
        default: Option<&'static str>,
    ) -> Option<&'static str> {
        let v = match (self.raw(key), default) {
            (None, Some(d)) => return Some(d),
            (None, None) => return self.required(key).and(None),
            (Some(v), _) => v,
        };
        let expected = allowed.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" | ");
        match v {
            Value::String(s) => match allowed.iter().find(|a| **a == s) {
                Some(a) => Some(a),
                None => {
                    self.fail(key, format!("Invalid enum value. Expected {expected}, received '{s}'"));
                    None
                }
            },
            // zod's wording for a value that is not a string at all.
            other => {
                self.fail(key, format!("Expected {expected}, received {}", type_name(other)));
                None
            }
        }
    }

    /// A nested optional object; `None` inside when absent.
    pub fn object(&mut self, key: &str) -> Option<Option<Fields<'_>>> {
        let top = self.field(key);
        match self.raw(key) {
            None => Some(None),
            Some(Value::Object(m)) => Some(Some(Fields { obj: Some(m), top, errors: &mut *self.errors })),
            Some(v) => {
                let msg = format!("Expected object, received {}", type_name(v));
                self.errors.add(&top, msg);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collects_every_failure_with_its_field() {
        let body = json!({"a": "", "n": 4000.5, "e": "xml", "f": null, "o": {"i": 1.5}, "l": ["x", 1, false]});
        let mut errs = FieldErrors::default();
        let mut f = Fields::root(&body, &mut errs);
        assert_eq!(f.string("a", 1, None), None);
        assert_eq!(f.string("missing", 1, None), None);
        assert_eq!(f.int("n", 1, 3600, Some(120)), None);
        assert_eq!(f.one_of("e", &["json", "text"], Some("text")), None);
        assert_eq!(f.one_of("f", &["json", "text"], Some("text")), None);
        assert_eq!(f.opt_strings("l"), None);
        let mut o = f.object("o").unwrap().unwrap();
        assert_eq!(o.int("i", 0, 10, None), None);
        assert_eq!(errs.fields["a"], vec!["String must contain at least 1 character(s)"]);
        assert_eq!(errs.fields["missing"], vec!["Required"]);
        assert_eq!(
            errs.fields["n"],
            vec!["Expected integer, received float", "Number must be less than or equal to 3600"]
        );
        assert_eq!(errs.fields["e"], vec!["Invalid enum value. Expected 'json' | 'text', received 'xml'"]);
        assert_eq!(errs.fields["f"], vec!["Expected 'json' | 'text', received null"]);
        // Nested failures are filed under their top-level field, as zod's flatten() does.
        assert_eq!(errs.fields["l"], vec!["Expected string, received number", "Expected string, received boolean"]);
        assert_eq!(errs.fields["o"], vec!["Expected integer, received float"]);
        assert_eq!(errs.fields.len(), 7, "{errs:?}");
    }

    #[test]
    fn string_lengths_count_utf16_units_as_javascript_does() {
        let body = json!({"emoji": "😀".repeat(65), "accents": "é".repeat(128)});
        let mut errs = FieldErrors::default();
        let mut f = Fields::root(&body, &mut errs);
        assert_eq!(f.string("emoji", 1, Some(128)), None, "65 emoji are 130 UTF-16 units");
        assert_eq!(f.string("accents", 1, Some(128)).map(|s| s.chars().count()), Some(128));
        assert_eq!(errs.fields["emoji"], vec!["String must contain at most 128 character(s)"]);
    }

    #[test]
    fn defaults_apply_when_absent() {
        let body = json!({});
        let mut errs = FieldErrors::default();
        let mut f = Fields::root(&body, &mut errs);
        assert_eq!(f.int("n", 1, 10, Some(3)), Some(3));
        assert_eq!(f.boolean("b", true), Some(true));
        assert!(errs.fields.is_empty());
    }

    #[test]
    fn non_object_body_is_a_form_error() {
        let mut errs = FieldErrors::default();
        let _ = Fields::root(&json!([1]), &mut errs);
        assert_eq!(errs.form, vec!["Expected object, received array"]);
    }
}

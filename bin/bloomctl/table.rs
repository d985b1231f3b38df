//! Human-readable tables. Timestamps (fields named `*_at`, `timestamp`, `until`, `not_before`,
//! `last_heartbeat`, which the API sends as epoch milliseconds) are shown in ISO 8601
//! UTC; `--json` output keeps them as they come.

use bloom::time::iso8601;
use serde_json::Value;

/// Renders `rows` (JSON objects) as aligned columns; `columns` are (header, JSON pointer).
pub fn render(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns.iter().map(|(_, ptr)| field(field_name(ptr), r.pointer(ptr).unwrap_or(&Value::Null))).collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| cells.iter().map(|c| c[i].chars().count()).chain([h.len()]).max().unwrap_or(0).min(60))
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<String>| {
        vals.iter().zip(&widths).map(|(v, w)| format!("{:<w$}", truncate(v, *w), w = w)).collect::<Vec<_>>().join("  ")
    };
    out.push_str(line(columns.iter().map(|(h, _)| h.to_string()).collect()).trim_end());
    out.push('\n');
    for row in cells {
        out.push_str(line(row).trim_end());
        out.push('\n');
    }
    out
}

fn truncate(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The last segment of a JSON pointer.
fn field_name(pointer: &str) -> &str {
    pointer.rsplit('/').next().unwrap_or(pointer)
}

fn is_timestamp(name: &str) -> bool {
    name.ends_with("_at") || matches!(name, "timestamp" | "last_heartbeat" | "until" | "not_before")
}

/// The cell of field `name`: a timestamp as ISO 8601 UTC, anything else as [`cell`].
fn field(name: &str, v: &Value) -> String {
    match v.as_i64() {
        Some(ms) if is_timestamp(name) => iso8601(ms),
        _ => cell(v),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.replace('\n', " "),
        other => other.to_string(),
    }
}

/// Renders one object as `key: value` lines.
pub fn record(v: &Value) -> String {
    match v.as_object() {
        Some(map) => {
            let w = map.keys().map(|k| k.len()).max().unwrap_or(0);
            map.iter().map(|(k, v)| format!("{k:<w$}  {}\n", field(k, v), w = w)).collect()
        }
        None => format!("{v}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_read_as_iso_8601_utc() {
        let row = json!({"id": "t1", "created_at": 0, "attempts": 2, "last_heartbeat": null});
        let table = render(
            std::slice::from_ref(&row),
            &[("ID", "/id"), ("CREATED_AT", "/created_at"), ("ATTEMPTS", "/attempts")],
        );
        assert_eq!(table.lines().nth(1), Some("t1  1970-01-01T00:00:00.000Z  2"));
        let rec = record(&row);
        assert!(rec.contains("created_at      1970-01-01T00:00:00.000Z\n"), "{rec}");
        assert!(rec.contains("last_heartbeat  -\n"), "{rec}");
    }
}

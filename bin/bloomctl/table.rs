//! Human-readable tables.

use serde_json::Value;

/// Renders `rows` (JSON objects) as aligned columns; `columns` are (header, JSON pointer).
pub fn render(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, ptr)| cell(r.pointer(ptr).unwrap_or(&Value::Null))).collect())
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
            map.iter().map(|(k, v)| format!("{k:<w$}  {}\n", cell(v), w = w)).collect()
        }
        None => format!("{v}\n"),
    }
}

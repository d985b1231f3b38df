//! Human-readable tables. Timestamps (fields named `*_at`, `timestamp`,
//! `last_heartbeat`, which the API sends as epoch milliseconds) are shown in ISO 8601
//! UTC; `--json` output keeps them as they come.

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
    name.ends_with("_at") || name == "timestamp" || name == "last_heartbeat"
}

/// The cell of field `name`: a timestamp as ISO 8601 UTC, anything else as [`cell`].
fn field(name: &str, v: &Value) -> String {
    match v.as_i64() {
        Some(ms) if is_timestamp(name) => iso8601(ms),
        _ => cell(v),
    }
}

/// Epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, sec, milli) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{milli:03}Z")
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999Z");
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

//! The Claude CLI's output read into a result: the `--output-format json` envelope
//! (`{"type":"result",...}`) or the `stream-json` lines that end with one, with what the
//! run used and, for a failed run, its class.
//!
//! A run failed when its result says `is_error: true` (a failed API call can end with
//! `subtype: success`) or its subtype is an error. The class:
//!
//! | the run reported | class |
//! |---|---|
//! | `subtype: error_max_turns` | `max_turns` |
//! | `subtype: error_max_budget_usd` | `max_budget` |
//! | `api_error_status: 429`, a rejected `rate_limit_event`, "usage limit reached" | `rate_limited`, until the event's `resetsAt` (or the time after `|` in the message) |
//! | `api_error_status` 5xx (529 overloaded included), "overloaded", "API Error: 5.." | `provider` |
//! | anything else | `execution` |

use serde_json::{Map, Value};

use crate::domain::{ErrorKind, Usage};

/// What a run reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The result text (`result`), when there is one.
    pub output: Option<String>,
    pub usage: Usage,
    /// The class of a failed run and its message.
    pub failure: Option<(ErrorKind, String)>,
    /// When the provider allows another run (epoch ms), if it said.
    pub retry_at: Option<i64>,
}

/// Reads `stdout` as the CLI's output; `None` when it is not (plain text, other JSON).
pub fn parse(stdout: &str) -> Option<Report> {
    let trimmed = stdout.trim();
    let mut result = None;
    let mut resets_at = None;
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(trimmed) {
        if o.get("type").and_then(Value::as_str) == Some("result") {
            result = Some(o);
        }
    } else {
        for line in trimmed.lines() {
            let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line.trim()) else { continue };
            match o.get("type").and_then(Value::as_str) {
                Some("result") => result = Some(o),
                Some("rate_limit_event") => {
                    let info = o.get("rate_limit_info");
                    let rejected = info.and_then(|i| i.get("status")).and_then(Value::as_str) == Some("rejected");
                    if rejected {
                        resets_at = info.and_then(|i| i.get("resetsAt")).and_then(Value::as_i64).map(|s| s * 1000);
                    }
                }
                _ => {}
            }
        }
    }
    let result = result?;
    let usage = usage_of(&result);
    let output = result.get("result").and_then(Value::as_str).map(str::to_owned);
    let failure = failure_of(&usage, output.as_deref(), resets_at.is_some());
    let retry_at = match &failure {
        Some((ErrorKind::RateLimited, _)) => resets_at.or_else(|| output.as_deref().and_then(reset_in_message)),
        _ => None,
    };
    Some(Report { output, usage, failure, retry_at })
}

fn usage_of(r: &Map<String, Value>) -> Usage {
    let u = r.get("usage");
    let tokens = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_i64);
    let text = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_owned);
    Usage {
        total_cost_usd: r.get("total_cost_usd").and_then(Value::as_f64),
        input_tokens: tokens("input_tokens"),
        output_tokens: tokens("output_tokens"),
        cache_read_input_tokens: tokens("cache_read_input_tokens"),
        cache_creation_input_tokens: tokens("cache_creation_input_tokens"),
        num_turns: r.get("num_turns").and_then(Value::as_i64),
        duration_api_ms: r.get("duration_api_ms").and_then(Value::as_i64),
        session_id: text("session_id"),
        subtype: text("subtype"),
        is_error: r.get("is_error").and_then(Value::as_bool),
        api_error_status: r.get("api_error_status").and_then(Value::as_i64),
    }
}

fn failure_of(usage: &Usage, output: Option<&str>, rate_limit_rejected: bool) -> Option<(ErrorKind, String)> {
    let subtype = usage.subtype.as_deref().unwrap_or("success");
    if usage.is_error != Some(true) && !subtype.starts_with("error") {
        return None;
    }
    let text = output.filter(|t| !t.trim().is_empty());
    let message = |fallback: String| text.map_or(fallback, str::to_owned);
    let lower = text.unwrap_or("").to_ascii_lowercase();
    let status = usage.api_error_status;
    let kind = match subtype {
        "error_max_turns" => ErrorKind::MaxTurns,
        "error_max_budget_usd" => ErrorKind::MaxBudget,
        _ if status == Some(429)
            || rate_limit_rejected
            || lower.contains("usage limit reached")
            || lower.contains("rate limit") =>
        {
            ErrorKind::RateLimited
        }
        _ if status.is_some_and(|s| (500..600).contains(&s))
            || lower.contains("overloaded")
            || lower.starts_with("api error: 5") =>
        {
            ErrorKind::Provider
        }
        _ => ErrorKind::Execution,
    };
    let fallback = match kind {
        ErrorKind::MaxTurns => {
            format!("the agent reached its turn limit ({} turns)", usage.num_turns.unwrap_or_default())
        }
        ErrorKind::MaxBudget => "the run reached its budget (error_max_budget_usd)".to_owned(),
        _ => match status {
            Some(s) => format!("the CLI reported an error (subtype {subtype}, API status {s})"),
            None => format!("the CLI reported an error (subtype {subtype})"),
        },
    };
    Some((kind, message(fallback)))
}

/// What a run reported it cost so far on one line of its output, when the line is a JSON
/// object with `total_cost_usd` that is not the final result (the run is over then): a
/// progress line, as a wrapper around the CLI prints while the run goes on.
pub fn cost_so_far(line: &[u8]) -> Option<f64> {
    const FIELD: &[u8] = b"total_cost_usd";
    if !line.windows(FIELD.len()).any(|w| w == FIELD) {
        return None;
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(o)) if o.get("type").and_then(Value::as_str) != Some("result") => {
            o.get("total_cost_usd").and_then(Value::as_f64)
        }
        _ => None,
    }
}

/// The reset time in a "usage limit reached|<epoch seconds>" message, in epoch ms.
fn reset_in_message(text: &str) -> Option<i64> {
    let (_, tail) = text.rsplit_once('|')?;
    let secs: i64 = tail.trim().parse().ok()?;
    (secs > 0).then_some(secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_json_envelope_gives_output_and_usage() {
        let out = json!({"type": "result", "subtype": "success", "is_error": false, "result": "hi",
            "total_cost_usd": 0.0123, "num_turns": 2, "duration_api_ms": 900, "session_id": "s1",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 7}});
        let r = parse(&out.to_string()).unwrap();
        assert_eq!(r.output.as_deref(), Some("hi"));
        assert_eq!(r.failure, None);
        assert_eq!(r.usage.total_cost_usd, Some(0.0123));
        assert_eq!(r.usage.tokens(), Some(15));
        assert_eq!(r.usage.cache_read_input_tokens, Some(100));
        assert_eq!(r.usage.cache_creation_input_tokens, Some(7));
        assert_eq!(r.usage.session_id.as_deref(), Some("s1"));
        assert_eq!(r.usage.num_turns, Some(2));
    }

    #[test]
    fn lines_that_report_a_cost_are_read() {
        assert_eq!(cost_so_far(br#"{"type":"progress","total_cost_usd":0.25}"#), Some(0.25));
        assert_eq!(cost_so_far(br#"{"type":"result","total_cost_usd":0.25}"#), None, "the end, not progress");
        assert_eq!(cost_so_far(br#"{"type":"assistant","message":{}}"#), None);
        assert_eq!(cost_so_far(b"total_cost_usd: 3"), None);
    }

    #[test]
    fn plain_text_and_other_json_are_not_cli_output() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse(r#"{"a": 1}"#), None);
        assert_eq!(parse("{\"type\":\"system\"}\n{\"type\":\"assistant\"}"), None);
    }

    #[test]
    fn failures_are_classified() {
        let kind = |v: Value| parse(&v.to_string()).and_then(|r| r.failure).map(|f| f.0);
        let base = |extra: Value| {
            let mut o = json!({"type": "result", "subtype": "success", "is_error": true, "result": "x"});
            o.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            o
        };
        assert_eq!(kind(base(json!({"subtype": "error_max_turns"}))), Some(ErrorKind::MaxTurns));
        assert_eq!(kind(base(json!({"subtype": "error_max_budget_usd"}))), Some(ErrorKind::MaxBudget));
        assert_eq!(kind(base(json!({"api_error_status": 429}))), Some(ErrorKind::RateLimited));
        assert_eq!(kind(base(json!({"api_error_status": 529}))), Some(ErrorKind::Provider));
        assert_eq!(kind(base(json!({"result": "API Error: 500 internal"}))), Some(ErrorKind::Provider));
        assert_eq!(kind(base(json!({"subtype": "error_during_execution"}))), Some(ErrorKind::Execution));
        assert_eq!(kind(base(json!({"is_error": false}))), None);
    }

    #[test]
    fn a_rejected_rate_limit_event_gives_the_reset_time() {
        let lines = [
            json!({"type": "system", "subtype": "init", "session_id": "s"}),
            json!({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1_800_000_000,
                   "rateLimitType": "five_hour"}}),
            json!({"type": "result", "subtype": "success", "is_error": true, "result": "limit"}),
        ];
        let text: Vec<String> = lines.iter().map(Value::to_string).collect();
        let r = parse(&text.join("\n")).unwrap();
        assert_eq!(r.failure.map(|f| f.0), Some(ErrorKind::RateLimited));
        assert_eq!(r.retry_at, Some(1_800_000_000_000));
        let msg = json!({"type": "result", "is_error": true, "result": "Claude AI usage limit reached|1800000100"});
        assert_eq!(parse(&msg.to_string()).unwrap().retry_at, Some(1_800_000_100_000));
    }
}

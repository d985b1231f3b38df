//! Concurrency keys: "at most N tasks of a key running at once", where the key is a
//! task's `context_id`, its `agent_slug`, or the free `concurrency_key` given at submit.
//!
//! A limit names its scope and one key, or [`ANY_KEY`] for every key of the scope that
//! has no limit of its own. The running tasks of one key under a limit hold its *slot*
//! (named `scope:key`); Postgres admits a task only while each of its slots has room
//! (`bloom_admit`, migration 0021).

use serde::{Deserialize, Serialize};

/// The key of every task of a scope without a limit of its own.
pub const ANY_KEY: &str = "*";

/// The largest `max_running` a limit may have.
pub const MAX_RUNNING_LIMIT: i32 = 1_000_000;

/// The longest key a limit or a task may name.
pub const MAX_KEY_LEN: usize = 255;

/// What a concurrency limit counts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum ConcurrencyScope {
    /// The task's conversation: limit 1 runs a conversation's tasks one at a time.
    ContextId,
    /// The agent (typically a model or provider account).
    AgentSlug,
    /// The free key a task was submitted with (tasks without one are not counted).
    ConcurrencyKey,
}

impl ConcurrencyScope {
    pub const ALL: [ConcurrencyScope; 3] =
        [ConcurrencyScope::ContextId, ConcurrencyScope::AgentSlug, ConcurrencyScope::ConcurrencyKey];

    pub fn as_str(self) -> &'static str {
        match self {
            ConcurrencyScope::ContextId => "context_id",
            ConcurrencyScope::AgentSlug => "agent_slug",
            ConcurrencyScope::ConcurrencyKey => "concurrency_key",
        }
    }

    pub fn parse(s: &str) -> Option<ConcurrencyScope> {
        ConcurrencyScope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// A limit: at most `max_running` tasks of `key` (or of each key of the scope, for
/// [`ANY_KEY`]) leased or running at once. 0 holds the key's tasks until it is raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConcurrencyLimit {
    pub scope: ConcurrencyScope,
    pub key: String,
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_running: i32,
}

impl ConcurrencyLimit {
    /// A checked limit: a key of 1 to [`MAX_KEY_LEN`] characters, `max_running` within
    /// `0..=MAX_RUNNING_LIMIT`. The error names the field.
    pub fn new(scope: ConcurrencyScope, key: &str, max_running: i64) -> Result<ConcurrencyLimit, String> {
        if key.is_empty() || key.chars().count() > MAX_KEY_LEN {
            return Err(format!("key must be 1 to {MAX_KEY_LEN} characters"));
        }
        let max_running = i32::try_from(max_running)
            .ok()
            .filter(|n| (0..=MAX_RUNNING_LIMIT).contains(n))
            .ok_or_else(|| format!("max_running must be an integer from 0 to {MAX_RUNNING_LIMIT}"))?;
        Ok(ConcurrencyLimit { scope, key: key.to_owned(), max_running })
    }

    /// Limits as configuration writes them: `scope:key=N`, comma separated, e.g.
    /// `context_id:*=1,agent_slug:writer=4` (a key may contain `:` and `=`; the last `=`
    /// ends it).
    pub fn parse_list(s: &str) -> Result<Vec<ConcurrencyLimit>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                let bad = || format!("'{item}' is not scope:key=N");
                let (target, n) = item.rsplit_once('=').ok_or_else(bad)?;
                let (scope, key) = target.split_once(':').ok_or_else(bad)?;
                let scope = ConcurrencyScope::parse(scope.trim())
                    .ok_or_else(|| format!("'{item}': the scope must be context_id, agent_slug or concurrency_key"))?;
                let n: i64 = n.trim().parse().map_err(|_| bad())?;
                ConcurrencyLimit::new(scope, key.trim(), n).map_err(|e| format!("'{item}': {e}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_lists_parse_and_name_what_is_wrong() {
        let limits =
            ConcurrencyLimit::parse_list(" context_id:*=1, agent_slug:writer=4,concurrency_key:a:b=c=0 ").unwrap();
        assert_eq!(
            limits,
            vec![
                ConcurrencyLimit { scope: ConcurrencyScope::ContextId, key: "*".into(), max_running: 1 },
                ConcurrencyLimit { scope: ConcurrencyScope::AgentSlug, key: "writer".into(), max_running: 4 },
                ConcurrencyLimit { scope: ConcurrencyScope::ConcurrencyKey, key: "a:b=c".into(), max_running: 0 },
            ]
        );
        assert_eq!(ConcurrencyLimit::parse_list("").unwrap(), vec![]);
        assert!(ConcurrencyLimit::parse_list("model:x=1").unwrap_err().contains("scope must be"));
        assert!(ConcurrencyLimit::parse_list("context_id=1").unwrap_err().contains("not scope:key=N"));
        assert!(ConcurrencyLimit::parse_list("context_id:c=-1").unwrap_err().contains("max_running"));
        assert!(ConcurrencyLimit::parse_list("context_id:=1").unwrap_err().contains("key must be"));
    }
}

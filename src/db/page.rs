//! Keyset pagination for list endpoints: `limit` plus an opaque cursor naming the last row.

/// Default and maximum page sizes of list endpoints.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest page a client may ask for.
pub const MAX_LIMIT: i64 = 1000;

/// Rows a filtered page reads at most when its filter has no index to narrow the
/// reading (an audit filter without an entity, a task filter by context, agent, priority
/// or prompt): newest first, the matches among them. Such a page may hold fewer rows than
/// asked for and still go on: its next cursor is where the reading stopped.
pub const SCAN_LIMIT: i64 = 10_000;

/// Position after which the next page starts: the sort key and id of the last row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub key: i64,
    pub id: String,
}

impl Cursor {
    /// Encodes as `<key>.<id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.key, self.id)
    }

    /// Decodes `<key>.<id>`; `None` when malformed.
    pub fn decode(s: &str) -> Option<Cursor> {
        let (key, id) = s.split_once('.')?;
        Some(Cursor { key: key.parse().ok()?, id: id.to_owned() })
    }
}

/// A page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub after: Option<Cursor>,
}

impl Default for Page {
    fn default() -> Self {
        Page { limit: DEFAULT_LIMIT, after: None }
    }
}

impl Page {
    /// The first `limit` rows.
    pub fn first(limit: i64) -> Page {
        Page { limit, after: None }
    }

    /// Where the page after one of `rows` rows ending with `last` starts: after `last`
    /// when the page is full, else nowhere (the listing ended).
    pub fn next(&self, rows: usize, last: Option<Cursor>) -> Option<Cursor> {
        last.filter(|_| rows as i64 == self.limit)
    }

    /// Key and id bounds for `WHERE (key, id) < ($k, $i)`: unbounded without a cursor.
    pub fn bounds(&self) -> (i64, String) {
        match &self.after {
            Some(c) => (c.key, c.id.clone()),
            None => (i64::MAX, String::new()),
        }
    }
}

/// A row of a listing before it is read: its sort key, id, and about how many bytes
/// its large columns hold (their raw length, read without fetching them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKey {
    pub key: i64,
    pub id: String,
    pub bytes: i64,
}

/// A page of row keys and where the next page starts (`None`: the listing ends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPage {
    pub keys: Vec<RowKey>,
    pub next: Option<Cursor>,
}

impl KeyPage {
    /// A page read in full: it goes on after its last row when it holds `page.limit` rows.
    pub fn full_or_last(keys: Vec<RowKey>, page: &Page) -> KeyPage {
        let next = page.next(keys.len(), keys.last().map(RowKey::cursor));
        KeyPage { keys, next }
    }
}

impl RowKey {
    /// The cursor of the page after this row.
    pub fn cursor(&self) -> Cursor {
        Cursor { key: self.key, id: self.id.clone() }
    }
}

/// Splits a listing into consecutive runs of ids holding at most `budget` bytes each
/// (a larger row goes alone), so it can be read and sent a run at a time.
pub fn runs(keys: &[RowKey], budget: i64) -> Vec<Vec<String>> {
    let mut runs: Vec<Vec<String>> = Vec::new();
    let mut used = 0;
    for k in keys {
        match runs.last_mut() {
            Some(run) if used + k.bytes <= budget => {
                run.push(k.id.clone());
                used += k.bytes;
            }
            _ => {
                runs.push(vec![k.id.clone()]);
                used = k.bytes;
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stay_within_the_budget_and_keep_the_order() {
        let key = |id: &str, bytes| RowKey { key: 0, id: id.into(), bytes };
        let keys = [key("a", 10), key("b", 50), key("c", 200), key("d", 40), key("e", 60)];
        assert_eq!(runs(&keys, 100), vec![vec!["a", "b"], vec!["c"], vec!["d", "e"]]);
        assert!(runs(&[], 100).is_empty());
    }

    #[test]
    fn cursor_round_trips_ids_with_dots() {
        let c = Cursor { key: 42, id: "a.b.c".into() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("x.y"), None);
        assert_eq!(Cursor::decode("nodot"), None);
    }
}

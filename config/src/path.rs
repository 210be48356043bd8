//! Key paths such as `outbox.max_bytes` or `routes[1].when_full`, kept structured until a
//! problem is reported so that array indices can be mapped back to the file's own numbering
//! and problems sort naturally (`routes[2]` before `routes[10]`).

use std::fmt;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// A path from the document root to a key or array element.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    pub(crate) fn root() -> Self {
        Self::default()
    }

    /// This path extended by a key.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut out = self.clone();
        out.push(Segment::Key(key.to_owned()));
        out
    }

    /// This path extended by an array index.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut out = self.clone();
        out.push(Segment::Index(index));
        out
    }

    pub(crate) fn push(&mut self, segment: Segment) {
        self.0.push(segment);
    }

    pub(crate) fn pop(&mut self) -> Option<Segment> {
        self.0.pop()
    }

    pub(crate) fn last(&self) -> Option<&Segment> {
        self.0.last()
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// Whether `prefix` is this path or one of its ancestors.
    pub(crate) fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    pub(crate) fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self` followed by every segment of `tail`.
    pub(crate) fn join(&self, tail: &KeyPath) -> Self {
        let mut out = self.clone();
        out.0.extend(tail.0.iter().cloned());
        out
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A problem before it is rendered into a public [`crate::Problem`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Issue {
    pub(crate) path: KeyPath,
    pub(crate) message: String,
    /// Another key the problem involves (e.g. the first of two duplicates); rendered after
    /// the message as ` (also {see})`.
    pub(crate) see: Option<KeyPath>,
}

impl Issue {
    pub(crate) fn new(path: KeyPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            see: None,
        }
    }

    /// Applies `f` to every path in the issue.
    pub(crate) fn map_paths(self, f: impl Fn(&KeyPath) -> KeyPath) -> Self {
        Self {
            path: f(&self.path),
            message: self.message,
            see: self.see.as_ref().map(f),
        }
    }
}

/// Sorts issues by path (indices numerically), drops duplicates and renders them.
pub(crate) fn into_problems(mut issues: Vec<Issue>) -> Vec<crate::Problem> {
    issues.sort();
    issues.dedup();
    issues
        .into_iter()
        .map(|issue| crate::Problem {
            path: issue.path.to_string(),
            message: match issue.see {
                Some(see) => format!("{} (also {see})", issue.message),
                None => issue.message,
            },
        })
        .collect()
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo or an
/// abbreviation (`prio` → `priority`).
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_lowercase();
    let limit = 2.max(word.chars().count() / 3);
    let close = candidates
        .iter()
        .map(|c| (edit_distance(&lower, &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= limit && *d < c.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    close.or_else(|| {
        let mut prefixed = candidates
            .iter()
            .filter(|c| lower.len() >= 3 && c.to_lowercase().starts_with(&lower));
        match (prefixed.next(), prefixed.next()) {
            (Some(only), None) => Some(*only),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let p = KeyPath::root().key("routes").index(1).key("when_full");
        assert_eq!(p.to_string(), "routes[1].when_full");
        assert_eq!(KeyPath::root().key("a.b").key("x").to_string(), "\"a.b\".x");
    }

    #[test]
    fn natural_order() {
        let a = KeyPath::root().key("routes").index(2);
        let b = KeyPath::root().key("routes").index(10);
        assert!(a < b);
    }

    #[test]
    fn suggestions() {
        let keys = [
            "max_bytes",
            "max_record_bytes",
            "min_free_disk",
            "when_full",
        ];
        assert_eq!(suggest("max_byts", &keys), Some("max_bytes"));
        assert_eq!(suggest("MAX_BYTES", &keys), Some("max_bytes"));
        assert_eq!(suggest("whenfull", &keys), Some("when_full"));
        assert_eq!(suggest("colour", &keys), None);
        assert_eq!(suggest("when", &keys), Some("when_full"));
        assert_eq!(suggest("max", &keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}

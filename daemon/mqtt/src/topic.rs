//! Topic filters: validation (MQTT 5 §4.7), matching, and the subscription tree the router
//! looks publishes up in.
//!
//! Matching rules: `+` matches one whole level, `#` the parent level and everything below it;
//! a filter starting with a wildcard does not match a topic starting with `$` (MQTT-4.7.2-1).

use std::collections::HashMap;

/// Why a topic filter is refused (SUBACK 0x8F in MQTT 5, 0x80 before).
pub fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("a topic filter must not be empty (MQTT-4.7.3-1)");
    }
    if filter.len() > usize::from(u16::MAX) {
        return Err("topic filter too long");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("'#' must be a whole level and the last one (MQTT-4.7.1-1)");
        }
        if level.contains('+') && level != "+" {
            return Err("'+' must be a whole level (MQTT-4.7.1-2)");
        }
    }
    Ok(())
}

/// A shared subscription (`$share/<group>/<filter>`), which this server does not offer.
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/")
}

/// Whether `filter` (valid) matches the topic name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Subscriptions by filter, as a tree of levels: a lookup costs the depth of the topic, not the
/// number of subscriptions. `V` is what a subscription holds (its options); keys are session
/// numbers.
#[derive(Debug)]
pub struct SubTree<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Subscriptions whose filter ends here with `#`.
    hash: HashMap<u64, V>,
    /// Subscriptions whose filter ends exactly here.
    exact: HashMap<u64, V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: HashMap::new(),
            exact: HashMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.exact.is_empty()
    }
}

impl<V> Default for SubTree<V> {
    fn default() -> Self {
        SubTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> SubTree<V> {
    /// Number of (filter, session) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces the subscription of `session` to `filter` (valid); returns the old value.
    pub fn insert(&mut self, filter: &str, session: u64, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                let old = node.hash.insert(session, value);
                self.len += usize::from(old.is_none());
                return old;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                let old = node.exact.insert(session, value);
                self.len += usize::from(old.is_none());
                return old;
            }
        }
        None
    }

    /// Removes the subscription of `session` to `filter`; prunes emptied branches.
    pub fn remove(&mut self, filter: &str, session: u64) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, session);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Calls `each` for every subscription matching the topic name `topic`.
    pub fn for_each_match(&self, topic: &str, mut each: impl FnMut(u64, &V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, 0, dollar, &mut each);
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str], session: u64) -> Option<V> {
    let (level, rest) = levels.split_first()?;
    if *level == "#" {
        return node.hash.remove(&session);
    }
    if *level == "+" {
        let child = node.plus.as_deref_mut()?;
        let removed = if rest.is_empty() {
            child.exact.remove(&session)
        } else {
            remove_at(child, rest, session)
        };
        if child.is_empty() {
            node.plus = None;
        }
        removed
    } else {
        let child = node.children.get_mut(*level)?;
        let removed = if rest.is_empty() {
            child.exact.remove(&session)
        } else {
            remove_at(child, rest, session)
        };
        if child.is_empty() {
            node.children.remove(*level);
        }
        removed
    }
}

fn walk<V>(
    node: &Node<V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    each: &mut impl FnMut(u64, &V),
) {
    // Wildcards at the first level never match a `$` topic.
    let wild = !(dollar && depth == 0);
    if wild {
        for (id, v) in &node.hash {
            each(*id, v);
        }
    }
    let Some((level, rest)) = levels.split_first() else {
        return;
    };
    let mut visit = |child: &Node<V>| {
        if rest.is_empty() {
            for (id, v) in &child.exact {
                each(*id, v);
            }
            // `a/#` also matches `a`: the `#` of the child covers its parent level.
            for (id, v) in &child.hash {
                each(*id, v);
            }
        } else {
            walk(child, rest, depth + 1, dollar, each);
        }
    };
    if let Some(child) = node.children.get(*level) {
        visit(child);
    }
    if wild && let Some(child) = node.plus.as_deref() {
        visit(child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_like_the_specification_says() {
        for ok in [
            "#", "+", "a", "a/b", "a/+", "a/#", "+/+/#", "/", "a//b", "$SYS/#", "a b",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+", "+a/b", "a/++", "##"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_the_specification() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/a", true),
            ("+", "/a", false),
            ("a/+/c", "a//c", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), want, "{filter} {topic}");
        }
    }

    #[test]
    fn the_tree_agrees_with_matching_and_prunes() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/+", "+", "a/+/c", "$SYS/#", "+/x", "a/b/c", "/#",
        ];
        let topics = [
            "a/b", "a", "a/b/c", "/a", "a//c", "$SYS/x", "b/x", "x", "/", "",
        ];
        let mut tree = SubTree::default();
        for (i, f) in filters.iter().enumerate() {
            assert!(tree.insert(f, i as u64, *f).is_none());
        }
        assert_eq!(tree.len(), filters.len());
        for topic in topics {
            let mut got = Vec::new();
            tree.for_each_match(topic, |id, f| got.push((id, *f)));
            got.sort_unstable();
            let want: Vec<(u64, &str)> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| matches(f, topic))
                .map(|(i, f)| (i as u64, *f))
                .collect();
            assert_eq!(got, want, "{topic:?}");
        }
        for (i, f) in filters.iter().enumerate() {
            assert_eq!(tree.remove(f, i as u64), Some(*f));
            assert_eq!(tree.remove(f, i as u64), None);
        }
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "every branch pruned");
    }
}

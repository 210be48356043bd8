//! Matching shared by `[[kafka.rules]]` and `[[edge.rules]]`: MQTT topic filters and device id
//! globs.

/// MQTT filter matching: `+` is one level, a final `#` the rest (including nothing).
pub fn topic_matches(filter: &[String], topic: &str) -> bool {
    let mut levels = topic.split('/');
    for (i, f) in filter.iter().enumerate() {
        if f == "#" && i + 1 == filter.len() {
            return true;
        }
        match levels.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// `*` matches any run of characters (also none); everything else literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    if !text.ends_with(last) {
        return false;
    }
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

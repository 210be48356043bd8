//! The collect-all loader: TOML text → every problem with its key path, or a typed [`Config`].
//!
//! serde stops at the first error, so the loader deserializes in rounds: each failure is
//! recorded with its path, the offending key is removed from the value tree (so its default
//! applies) and deserialization is retried. Each round removes something, escalating to the
//! parent when a path fails twice or cannot be removed, so the loop terminates; it is also
//! capped at [`MAX_ROUNDS`].
//!
//! Array elements that must be dropped shift the indices of later elements; [`Removed`] maps
//! indices back so every problem names the element as numbered in the file.
//!
//! `[[drivers]]` are internally tagged by `kind`; serde buffers such values and loses track of
//! paths inside them, so the loader reads `kind` itself and deserializes the variant's struct
//! directly.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

use crate::error::ConfigError;
use crate::model::{
    Config, DriverConfig, ModbusConfig, ModbusPointConfig, ModbusSlaveConfig, RouteConfig,
    SerialLineConfig, SimulatorConfig, ZigbeeConfig,
};
use crate::path::{Issue, KeyPath, Segment, into_problems, suggest};
use crate::validate;

/// Upper bound on deserialization rounds for one table.
const MAX_ROUNDS: usize = 100;

/// Parses, defaults and validates `text`; see [`crate::from_toml_str`].
pub(crate) fn load(text: &str) -> Result<Config, ConfigError> {
    let mut table: toml::Table = text.parse().map_err(|e| syntax_error(text, &e))?;
    let mut removed = Removed::default();
    let mut issues = Vec::new();

    let drivers = table.remove("drivers");
    check_shapes(&mut table, &mut removed, &mut issues);
    let mut config: Config = collect(table, &KeyPath::root(), &mut removed, &mut issues);
    config.drivers = collect_drivers(drivers, &mut removed, &mut issues);

    // A key that could not be read took its default; checking that default would only
    // repeat the problem (`routes[0].name = 3` is not also "missing").
    let unreadable: Vec<KeyPath> = issues.iter().map(|i| i.path.clone()).collect();
    issues.extend(
        validate::check(&config)
            .into_iter()
            .map(|issue| issue.map_paths(|p| removed.translate(p)))
            .filter(|issue| !unreadable.iter().any(|u| issue.path.starts_with(u))),
    );
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: None,
            problems: into_problems(issues),
        })
    }
}

fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim_end();
    let message = match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    };
    ConfigError::Syntax {
        path: None,
        message,
    }
}

/// Array elements dropped so far: original array path → original indices.
#[derive(Default)]
struct Removed(BTreeMap<KeyPath, BTreeSet<usize>>);

impl Removed {
    /// Maps a path into the current (pruned) tree to the file's numbering.
    fn translate(&self, current: &KeyPath) -> KeyPath {
        let mut out = KeyPath::root();
        for segment in current.segments() {
            match segment {
                Segment::Key(key) => out = out.key(key),
                Segment::Index(index) => {
                    let mut original = *index;
                    for gone in self.0.get(&out).into_iter().flatten() {
                        if *gone <= original {
                            original += 1;
                        }
                    }
                    out = out.index(original);
                }
            }
        }
        out
    }

    /// Records that the element at `current` (a path ending in an index) was dropped.
    fn record(&mut self, current: &KeyPath) {
        let mut original = self.translate(current);
        if let Some(Segment::Index(index)) = original.pop() {
            self.0.entry(original).or_default().insert(index);
        }
    }
}

/// Deserializes `T` from `table`, recording every problem (paths under `base`, a path into
/// the current tree) and returning a value in which each offending key took its default.
fn collect<T: DeserializeOwned + Default>(
    mut table: toml::Table,
    base: &KeyPath,
    removed: &mut Removed,
    issues: &mut Vec<Issue>,
) -> T {
    let mut previous: Option<(KeyPath, KeyPath)> = None; // (error path, removed path)
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, T>(table.clone()) {
            Ok(value) => return value,
            Err(error) => error,
        };
        let mut path = from_serde_path(error.path());
        let message = describe(&mut path, error.inner().message());
        issues.push(Issue::new(removed.translate(&base.join(&path)), message));

        let mut target = match &previous {
            Some((failed, target)) if *failed == path => {
                let mut parent = target.clone();
                parent.pop();
                parent
            }
            _ => path.clone(),
        };
        loop {
            if target.is_root() {
                return T::default();
            }
            if remove(&mut table, &target) {
                if let Some(Segment::Index(_)) = target.last() {
                    removed.record(&base.join(&target));
                }
                break;
            }
            target.pop();
        }
        previous = Some((path, target));
    }
    issues.push(Issue::new(
        removed.translate(base),
        format!("too many problems; gave up after {MAX_ROUNDS}"),
    ));
    T::default()
}

/// serde's derived structs also accept arrays (fields by position), so `outbox = []` would
/// pass silently. Wherever the default configuration has a table, insist on a table; other
/// wrong types are left to serde, which reports them with the expected type.
fn check_shapes(table: &mut toml::Table, removed: &mut Removed, issues: &mut Vec<Issue>) {
    let mut example = Config::default();
    example.routes.push(RouteConfig::default());
    if let Ok(toml::Value::Table(schema)) = toml::Value::try_from(&example) {
        check_table_shapes(table, &schema, &KeyPath::root(), removed, issues);
    }
}

fn check_table_shapes(
    table: &mut toml::Table,
    schema: &toml::Table,
    path: &KeyPath,
    removed: &mut Removed,
    issues: &mut Vec<Issue>,
) {
    for (key, expected) in schema {
        let here = path.key(key);
        match (expected, table.get_mut(key)) {
            (toml::Value::Table(inner_schema), Some(toml::Value::Table(inner))) => {
                check_table_shapes(inner, inner_schema, &here, removed, issues);
            }
            (toml::Value::Table(_), Some(toml::Value::Array(_))) => {
                let message = format!("expected {} table, found an array", article(&here));
                issues.push(Issue::new(removed.translate(&here), message));
                table.remove(key);
            }
            (toml::Value::Array(schemas), Some(toml::Value::Array(items))) => {
                let Some(toml::Value::Table(item_schema)) = schemas.first() else {
                    continue;
                };
                let mut index = 0;
                while index < items.len() {
                    let item_path = here.index(index);
                    match &mut items[index] {
                        toml::Value::Table(item) => {
                            check_table_shapes(item, item_schema, &item_path, removed, issues);
                            index += 1;
                        }
                        toml::Value::Array(_) => {
                            let message = format!("expected a [[{here}]] table, found an array");
                            issues.push(Issue::new(removed.translate(&item_path), message));
                            removed.record(&item_path);
                            items.remove(index);
                        }
                        _ => index += 1,
                    }
                }
            }
            _ => {}
        }
    }
}

/// [`check_shapes`] for one `[[drivers]]` element, against a filled-in `example` of its kind.
fn shape<T: serde::Serialize>(
    table: &mut toml::Table,
    example: &T,
    path: &KeyPath,
    removed: &mut Removed,
    issues: &mut Vec<Issue>,
) {
    if let Ok(toml::Value::Table(schema)) = toml::Value::try_from(example) {
        check_table_shapes(table, &schema, path, removed, issues);
    }
}

/// `a [gateway]`, `an [outbox]`.
fn article(path: &KeyPath) -> String {
    let name = path.to_string();
    let vowel = name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} [{name}]", if vowel { "an" } else { "a" })
}

/// `[[drivers]]`: checks each element's `kind`, then deserializes the kind's own struct.
/// Elements that cannot be read at all are dropped (and recorded in `removed`).
fn collect_drivers(
    value: Option<toml::Value>,
    removed: &mut Removed,
    issues: &mut Vec<Issue>,
) -> Vec<DriverConfig> {
    let drivers_path = KeyPath::root().key("drivers");
    let items = match value {
        None => return Vec::new(),
        Some(toml::Value::Array(items)) => items,
        Some(other) => {
            let message = format!(
                "expected an array of tables ([[drivers]]), found {}",
                describe_value(&other)
            );
            issues.push(Issue::new(drivers_path, message));
            return Vec::new();
        }
    };
    let kinds = DriverConfig::KINDS;
    let valid_kinds = quoted_list(kinds);
    let mut drivers = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let original = drivers_path.index(index);
        let current = drivers_path.index(drivers.len());
        let kind_problem = match item {
            toml::Value::Table(mut table) => match table.remove("kind") {
                Some(toml::Value::String(kind)) => match kind.as_str() {
                    "simulator" => {
                        let sim: SimulatorConfig = collect(table, &current, removed, issues);
                        drivers.push(DriverConfig::Simulator(sim));
                        continue;
                    }
                    "serial" => {
                        let example = SerialLineConfig::default();
                        shape(&mut table, &example, &current, removed, issues);
                        let c: SerialLineConfig = collect(table, &current, removed, issues);
                        drivers.push(DriverConfig::Serial(c));
                        continue;
                    }
                    "modbus" => {
                        let example = ModbusConfig {
                            serial: Some(Default::default()),
                            slaves: vec![ModbusSlaveConfig {
                                points: vec![ModbusPointConfig::default()],
                                ..ModbusSlaveConfig::default()
                            }],
                            ..ModbusConfig::default()
                        };
                        shape(&mut table, &example, &current, removed, issues);
                        let c: ModbusConfig = collect(table, &current, removed, issues);
                        drivers.push(DriverConfig::Modbus(c));
                        continue;
                    }
                    "zigbee" => {
                        let example = ZigbeeConfig::default();
                        shape(&mut table, &example, &current, removed, issues);
                        let c: ZigbeeConfig = collect(table, &current, removed, issues);
                        drivers.push(DriverConfig::Zigbee(c));
                        continue;
                    }
                    other => {
                        let hint = suggest(other, kinds)
                            .map(|s| format!(", did you mean \"{s}\"?"))
                            .unwrap_or_default();
                        Issue::new(
                            original.key("kind"),
                            format!("unknown driver kind \"{other}\"{hint} (kinds: {valid_kinds})"),
                        )
                    }
                },
                Some(other) => Issue::new(
                    original.key("kind"),
                    format!(
                        "expected one of {valid_kinds}, found {}",
                        describe_value(&other)
                    ),
                ),
                None => Issue::new(
                    original.key("kind"),
                    format!("missing required key (kinds: {valid_kinds})"),
                ),
            },
            other => Issue::new(
                original,
                format!(
                    "expected a table ([[drivers]]), found {}",
                    describe_value(&other)
                ),
            ),
        };
        issues.push(kind_problem);
        removed.record(&current);
    }
    drivers
}

/// Removes the key or element at `path`; false if there is nothing there.
fn remove(table: &mut toml::Table, path: &KeyPath) -> bool {
    match path.segments() {
        [Segment::Key(key)] => table.remove(key).is_some(),
        [Segment::Key(key), rest @ ..] => table
            .get_mut(key)
            .is_some_and(|child| remove_in(child, rest)),
        _ => false,
    }
}

fn remove_in(value: &mut toml::Value, path: &[Segment]) -> bool {
    match (path, value) {
        ([Segment::Key(key)], toml::Value::Table(table)) => table.remove(key).is_some(),
        ([Segment::Index(index)], toml::Value::Array(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        ([Segment::Key(key), rest @ ..], toml::Value::Table(table)) if !rest.is_empty() => table
            .get_mut(key)
            .is_some_and(|child| remove_in(child, rest)),
        ([Segment::Index(index), rest @ ..], toml::Value::Array(items)) if !rest.is_empty() => {
            items
                .get_mut(*index)
                .is_some_and(|child| remove_in(child, rest))
        }
        _ => false,
    }
}

fn from_serde_path(path: &serde_path_to_error::Path) -> KeyPath {
    let mut out = KeyPath::root();
    for segment in path {
        match segment {
            serde_path_to_error::Segment::Seq { index } => out.push(Segment::Index(*index)),
            serde_path_to_error::Segment::Map { key } => out.push(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Enum { .. } => {}
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    out
}

/// Rewrites serde's message for humans and, for unknown or missing keys, makes `path` name
/// the key itself.
fn describe(path: &mut KeyPath, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let Some((unknown, expected)) = names.split_first() else {
            return message.to_owned();
        };
        if path.last() != Some(&Segment::Key((*unknown).to_owned())) {
            path.push(Segment::Key((*unknown).to_owned()));
        }
        return match suggest(unknown, expected) {
            Some(s) => format!("unknown key `{unknown}`, did you mean `{s}`?"),
            None if expected.is_empty() => {
                format!("unknown key `{unknown}`; no keys are allowed here")
            }
            None => {
                let list: Vec<String> = expected.iter().map(|k| format!("`{k}`")).collect();
                format!(
                    "unknown key `{unknown}`; valid keys are {}",
                    list.join(", ")
                )
            }
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        let Some((unknown, expected)) = names.split_first() else {
            return message.to_owned();
        };
        let hint = suggest(unknown, expected)
            .map(|s| format!(", did you mean \"{s}\"?"))
            .unwrap_or_default();
        return format!(
            "unknown value \"{unknown}\"{hint} (expected one of {})",
            quoted_list(expected)
        );
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        if let Some(name) = backticked(rest).first() {
            path.push(Segment::Key((*name).to_owned()));
        }
        return "missing required key".to_owned();
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            return format!(
                "expected {}, found {}",
                expected_text(expected),
                found_text(found)
            );
        }
    }
    message.to_owned()
}

/// The names between backticks in a serde message.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    quoted.join(", ")
}

/// serde's name for an expected Rust type, in TOML terms.
fn expected_text(expected: &str) -> String {
    match expected {
        "u8" => "an integer from 0 to 255".to_owned(),
        "u16" => "an integer from 0 to 65535".to_owned(),
        "u32" => "an integer from 0 to 4294967295".to_owned(),
        "u64" | "usize" => "a non-negative integer".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".to_owned(),
        "a sequence" => "an array".to_owned(),
        "path string" => "a path string".to_owned(),
        "option" => "a value".to_owned(),
        other => other.to_owned(),
    }
}

/// serde's description of what was found, in TOML terms.
fn found_text(found: &str) -> String {
    match found {
        "map" => "a table".to_owned(),
        "sequence" => "an array".to_owned(),
        other => other.replace('`', ""),
    }
}

fn describe_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("string {s:?}"),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(x) => format!("floating point {x}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("datetime {d}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::problems;

    #[test]
    fn unknown_keys_everywhere_name_the_key() {
        let found =
            problems("colour = 1\n[log]\nlevl = \"debug\"\n[[routes]]\nname = \"a\"\nprio = 1\n");
        assert_eq!(
            found,
            [
                "colour: unknown key `colour`; valid keys are `gateway`, `log`, `admin`, \
                 `outbox`, `routes`, `drivers`, `api`, `devices`, `http_ingest`, `coap`, `apps`, `mqtt`, `kafka`, `edge`",
                "log.levl: unknown key `levl`, did you mean `level`?",
                "routes[0].prio: unknown key `prio`, did you mean `priority`?",
            ]
        );
    }

    #[test]
    fn dropped_elements_keep_file_numbering() {
        let found = problems(
            "routes = [1, {name = \"a\", priority = 12}, \"x\", {name = \"b\", when_full = \"drop\"}]\n",
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].starts_with("routes[0]: expected a [[routes]] table, found integer 1"));
        assert!(found[1].starts_with("routes[1].priority: must be between 0 and 9"));
        assert!(found[2].starts_with("routes[2]: expected a [[routes]] table, found string"));
        assert!(found[3].starts_with("routes[3].when_full: unknown value \"drop\""));
    }

    #[test]
    fn bad_drivers_keep_file_numbering() {
        let found = problems(concat!(
            "[[drivers]]\nname = \"a\"\n",
            "[[drivers]]\nkind = \"simulatr\"\nname = \"b\"\n",
            "[[drivers]]\nkind = 3\n",
            "[[drivers]]\nkind = \"simulator\"\nname = \"d\"\ndevices = 0\nfoo = 1\n",
            "[[drivers]]\nkind = \"simulator\"\nname = \"d\"\n",
        ));
        assert_eq!(
            found,
            [
                "drivers[0].kind: missing required key (kinds: \"simulator\", \"serial\", \"modbus\", \"zigbee\")",
                "drivers[1].kind: unknown driver kind \"simulatr\", did you mean \"simulator\"? \
                 (kinds: \"simulator\", \"serial\", \"modbus\", \"zigbee\")",
                "drivers[2].kind: expected one of \"simulator\", \"serial\", \"modbus\", \"zigbee\", found integer 3",
                "drivers[3].devices: must be between 1 and 10000, found 0",
                "drivers[3].foo: unknown key `foo`; valid keys are `name`, `devices`, \
                 `interval`, `payload_bytes`, `topic`, `route`, `max_readings`",
                "drivers[4].name: duplicate driver name \"d\" (also drivers[3].name)",
            ]
        );
        assert_eq!(
            problems("drivers = 5"),
            ["drivers: expected an array of tables ([[drivers]]), found integer 5"]
        );
        assert_eq!(
            problems("drivers = [5]"),
            ["drivers[0]: expected a table ([[drivers]]), found integer 5"]
        );
    }

    #[test]
    fn wrong_section_types() {
        let found = problems("gateway = 5\noutbox = []\n[admin]\nlisten = \"localhost:80\"\n");
        assert_eq!(found.len(), 3, "{found:#?}");
        assert_eq!(
            found[0],
            "admin.listen: invalid address \"localhost:80\": expected IP:port like \"0.0.0.0:8080\" or \"[::1]:8080\" (host names are not resolved)"
        );
        assert_eq!(
            found[1],
            "gateway: expected a [gateway] table, found integer 5"
        );
        assert_eq!(
            found[2],
            "outbox: expected an [outbox] table, found an array"
        );
        assert_eq!(
            problems("[[outbox]]\nmax_bytes = 1\n[[routes]]\nname = \"a\"\n"),
            ["outbox: expected an [outbox] table, found an array"]
        );
        assert_eq!(
            problems("routes = [[], {name = \"a\", priority = 10}]"),
            [
                "routes[0]: expected a [[routes]] table, found an array",
                "routes[1].priority: must be between 0 and 9 (higher is forwarded first), found 10",
            ]
        );
    }

    #[test]
    fn type_messages_name_what_was_expected() {
        let found = problems(concat!(
            "[outbox]\nmax_bytes = true\nbatch_max_records = -1\nsynchronous = 1\n",
            "[[routes]]\nname = \"r\"\npriority = 300\n",
        ));
        assert_eq!(
            found,
            [
                "outbox.batch_max_records: expected a non-negative integer, found integer -1",
                "outbox.max_bytes: expected a size like \"512MiB\" or a number of bytes, found boolean true",
                "outbox.synchronous: expected one of \"full\", \"normal\", found integer 1",
                "routes[0].priority: expected an integer from 0 to 255, found integer 300",
            ]
        );
    }

    #[test]
    fn unreadable_keys_are_not_reported_twice() {
        assert_eq!(
            problems("[[routes]]\nname = 3\n"),
            ["routes[0].name: expected a string, found integer 3"]
        );
    }

    #[test]
    fn translate_skips_removed_indices() {
        let mut removed = Removed::default();
        let arr = KeyPath::root().key("a");
        removed.record(&arr.index(0)); // original 0 gone
        removed.record(&arr.index(1)); // current 1 = original 2 gone
        assert_eq!(removed.translate(&arr.index(0)), arr.index(1));
        assert_eq!(removed.translate(&arr.index(1)), arr.index(3));
    }
}

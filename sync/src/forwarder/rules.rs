//! `[[kafka.rules]]` compiled: which Kafka topic and key a record gets, or whether it is dropped.
//!
//! Rules are tried in file order and the first whose every set match field matches decides;
//! a record no rule matches goes to `kafka.default_topic`, keyed by its device id. The rules are
//! evaluated when a record is forwarded (so a changed rule also applies to the backlog), except
//! for `priority`, which must be known when the record is stored: ingestion asks
//! [`Rules::priority`]. A reload replaces the whole list ([`SharedRules`]).

use std::sync::{Arc, PoisonError, RwLock};

use outpost_config::{CloudEvents, KafkaConfig, KafkaRule, RuleAction, RuleKey};

use crate::envelope::Source;

/// The registry's view the rules need: the tags of a device.
pub trait DeviceTags: Send + Sync {
    /// The device's tags; empty for an unknown device.
    fn tags(&self, device_id: &str) -> Vec<String>;
}

/// No registry: no device has tags.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTags;

impl DeviceTags for NoTags {
    fn tags(&self, _device_id: &str) -> Vec<String> {
        Vec::new()
    }
}

/// What a record looks like to the rules.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub device_id: &'a str,
    pub source: Source,
    pub topic: &'a str,
    pub seq: u64,
}

/// What happens to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'r> {
    /// Produce to `topic` with `key`, as CloudEvents or not.
    Forward {
        topic: &'r str,
        key: RuleKey,
        cloudevents: CloudEvents,
    },
    /// Delete without forwarding; `rule` names the rule that dropped it (drop or sample).
    Drop { rule: &'r str },
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    topic_filter: Option<Vec<String>>,
    source: Option<Source>,
    device: Option<String>,
    tag: Option<String>,
    kafka_topic: String,
    key: RuleKey,
    priority: Option<u8>,
    action: RuleAction,
    sample_every: u64,
    cloudevents: CloudEvents,
}

/// The rules in force, shared by ingestion (priorities) and the forwarder (topics, drops), and
/// replaced as a whole when the configuration is reloaded: a record is decided by one rule list,
/// never a mix. Each decision takes the current list ([`SharedRules::load`]), so a changed rule
/// applies to the next record, the backlog included.
#[derive(Debug, Clone)]
pub struct SharedRules(Arc<RwLock<Arc<Rules>>>);

impl SharedRules {
    pub fn new(rules: Rules) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(rules))))
    }

    /// The rules in force now.
    pub fn load(&self) -> Arc<Rules> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `rules` in force from the next decision on.
    pub fn replace(&self, rules: Rules) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
    }
}

/// The compiled rule list. Cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    default_topic: String,
    /// Where command status events go (created at start with the others).
    status_topic: String,
    /// Whether the gateway writes status events (`kafka.commands.enabled`).
    commands: bool,
    cloudevents: CloudEvents,
    uses_tags: bool,
}

impl Rules {
    /// Compiles validated config (`outpost_config` has checked every field).
    pub fn from_config(kafka: &KafkaConfig) -> Self {
        let rules: Vec<Rule> = kafka
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile(i, r, kafka))
            .collect();
        let uses_tags = rules.iter().any(|r| r.tag.is_some());
        Self {
            rules,
            default_topic: kafka.default_topic.clone(),
            status_topic: kafka.commands.status_topic.clone(),
            commands: kafka.commands.enabled,
            cloudevents: kafka.cloudevents,
            uses_tags,
        }
    }

    fn first_match(&self, record: &RecordView<'_>, tags: &dyn DeviceTags) -> Option<&Rule> {
        let device_tags = if self.uses_tags {
            tags.tags(record.device_id)
        } else {
            Vec::new()
        };
        self.rules.iter().find(|r| r.matches(record, &device_tags))
    }

    /// Where `record` goes.
    pub fn decide<'a>(&'a self, record: &RecordView<'a>, tags: &dyn DeviceTags) -> Decision<'a> {
        if record.source == Source::Gateway {
            // The gateway's own records are never routed by rules: a rule written for readings
            // must not drop or re-key command status events. Their topic is the Kafka topic
            // (`kafka.commands.status_topic`, or a command's `reply_topic`); keyed by device, so
            // one device's events keep their order.
            return Decision::Forward {
                topic: record.topic,
                key: RuleKey::Device,
                cloudevents: CloudEvents::Off,
            };
        }
        let Some(rule) = self.first_match(record, tags) else {
            return Decision::Forward {
                topic: &self.default_topic,
                key: RuleKey::Device,
                cloudevents: self.cloudevents,
            };
        };
        let forward = Decision::Forward {
            topic: &rule.kafka_topic,
            key: rule.key,
            cloudevents: rule.cloudevents,
        };
        match rule.action {
            RuleAction::Forward => forward,
            RuleAction::Drop => Decision::Drop { rule: &rule.name },
            // One in `sample_every` by gateway sequence: deterministic, so a re-forwarded record
            // (after an outage or a restart) gets the same verdict.
            RuleAction::Sample if record.seq.is_multiple_of(rule.sample_every) => forward,
            RuleAction::Sample => Decision::Drop { rule: &rule.name },
        }
    }

    /// The priority the first matching rule gives the record, if it sets one.
    pub fn priority(&self, record: &RecordView<'_>, tags: &dyn DeviceTags) -> Option<u8> {
        self.first_match(record, tags).and_then(|r| r.priority)
    }

    /// True when some rule sets a priority (ingestion can skip the lookup otherwise).
    pub fn sets_priorities(&self) -> bool {
        self.rules.iter().any(|r| r.priority.is_some())
    }

    /// Every Kafka topic records can be sent to (for creating missing topics at start).
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = std::iter::once(self.default_topic.clone())
            .chain(self.rules.iter().map(|r| r.kafka_topic.clone()))
            .chain(self.commands.then(|| self.status_topic.clone()))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

fn compile(index: usize, rule: &KafkaRule, kafka: &KafkaConfig) -> Rule {
    Rule {
        name: rule
            .name
            .clone()
            .unwrap_or_else(|| format!("rule-{}", index + 1)),
        topic_filter: rule
            .topic
            .as_ref()
            .map(|t| t.split('/').map(str::to_owned).collect()),
        source: rule.source.as_deref().and_then(|s| s.parse().ok()),
        device: rule.device.clone(),
        tag: rule.tag.clone(),
        kafka_topic: rule
            .kafka_topic
            .clone()
            .unwrap_or_else(|| kafka.default_topic.clone()),
        key: rule.key,
        priority: rule.priority,
        action: rule.action,
        sample_every: u64::from(rule.sample_every.max(1)),
        cloudevents: rule.cloudevents.unwrap_or(kafka.cloudevents),
    }
}

impl Rule {
    fn matches(&self, record: &RecordView<'_>, device_tags: &[String]) -> bool {
        self.source.is_none_or(|s| s == record.source)
            && self
                .device
                .as_deref()
                .is_none_or(|pattern| glob_matches(pattern, record.device_id))
            && self
                .tag
                .as_deref()
                .is_none_or(|tag| device_tags.iter().any(|t| t == tag))
            && self
                .topic_filter
                .as_deref()
                .is_none_or(|filter| topic_matches(filter, record.topic))
    }
}

pub use outpost_config::matching::{glob_matches, topic_matches};

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(f: &str) -> Vec<String> {
        f.split('/').map(str::to_owned).collect()
    }

    #[test]
    fn topic_filters() {
        assert!(topic_matches(&filter("a/+/c"), "a/b/c"));
        assert!(!topic_matches(&filter("a/+/c"), "a/b/c/d"));
        assert!(topic_matches(&filter("a/#"), "a"));
        assert!(topic_matches(&filter("a/#"), "a/b/c"));
        assert!(topic_matches(&filter("#"), "x"));
        assert!(!topic_matches(&filter("a/b"), "a"));
        assert!(topic_matches(&filter("a/b"), "a/b"));
    }

    #[test]
    fn globs() {
        assert!(glob_matches("pump-*", "pump-7"));
        assert!(glob_matches("pump-*", "pump-"));
        assert!(!glob_matches("pump-*", "valve-1"));
        assert!(glob_matches("*-7", "pump-7"));
        assert!(glob_matches("p*m*7", "pump-7"));
        assert!(!glob_matches("p*x*7", "pump-7"));
        assert!(glob_matches("a", "a"));
        assert!(!glob_matches("ab*ba", "aba"));
    }

    struct Tagged;
    impl DeviceTags for Tagged {
        fn tags(&self, device_id: &str) -> Vec<String> {
            if device_id == "d1" {
                vec!["vip".into()]
            } else {
                Vec::new()
            }
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let config: KafkaConfig = outpost_config::from_toml_str(
            r#"
            [kafka]
            default_topic = "readings"
            cloudevents = "binary"
            [[kafka.rules]]
            name = "noise"
            topic = "devices/+/debug/#"
            action = "drop"
            [[kafka.rules]]
            tag = "vip"
            kafka_topic = "vip"
            key = "topic"
            priority = 9
            cloudevents = "structured"
            [[kafka.rules]]
            source = "driver"
            device = "meter-*"
            action = "sample"
            sample_every = 4
            kafka_topic = "meters"
            "#,
        )
        .map(|c| c.kafka)
        .unwrap_or_else(|e| panic!("{e}"));
        let rules = Rules::from_config(&config);
        let view = |device_id, source, topic, seq| RecordView {
            device_id,
            source,
            topic,
            seq,
        };
        assert_eq!(
            rules.decide(&view("d1", Source::Mqtt, "devices/d1/debug/x", 1), &Tagged),
            Decision::Drop { rule: "noise" }
        );
        // The gateway's own records (command status events) are not the rules' to route.
        assert_eq!(
            rules.decide(
                &view("d1", Source::Gateway, "devices/d1/debug/x", 1),
                &Tagged
            ),
            Decision::Forward {
                topic: "devices/d1/debug/x",
                key: RuleKey::Device,
                cloudevents: CloudEvents::Off,
            }
        );
        assert_eq!(
            rules.decide(&view("d1", Source::Mqtt, "devices/d1/t", 1), &Tagged),
            Decision::Forward {
                topic: "vip",
                key: RuleKey::Topic,
                cloudevents: CloudEvents::Structured,
            }
        );
        assert_eq!(
            rules.priority(&view("d1", Source::Mqtt, "devices/d1/t", 1), &Tagged),
            Some(9)
        );
        assert_eq!(
            rules.decide(&view("meter-1", Source::Driver, "m", 8), &Tagged),
            Decision::Forward {
                topic: "meters",
                key: RuleKey::Device,
                cloudevents: CloudEvents::Binary,
            }
        );
        assert_eq!(
            rules.decide(&view("meter-1", Source::Driver, "m", 9), &Tagged),
            Decision::Drop { rule: "rule-3" }
        );
        assert_eq!(
            rules.decide(&view("d2", Source::Http, "x", 1), &Tagged),
            Decision::Forward {
                topic: "readings",
                key: RuleKey::Device,
                cloudevents: CloudEvents::Binary,
            }
        );
        assert_eq!(rules.topics(), ["meters", "readings", "vip"]);
    }
}

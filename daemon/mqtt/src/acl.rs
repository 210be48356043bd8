//! Topic ACLs: `[mqtt.acl]` patterns with `{id}` substituted by the authenticated device id.

use outpost_config::MqttAclConfig;

/// One device's permissions, patterns already resolved for its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Acl {
    /// Resolves the configured patterns for `device_id`.
    pub fn for_device(config: &MqttAclConfig, device_id: &str) -> Self {
        let resolve = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    p.split('/')
                        .map(|level| if level == "{id}" { device_id } else { level })
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .collect()
        };
        Self {
            publish: resolve(&config.publish),
            subscribe: resolve(&config.subscribe),
        }
    }

    /// Publish and subscribe anywhere (the local bus's own identity, tests).
    pub fn allow_all() -> Self {
        Self {
            publish: vec!["#".to_owned()],
            subscribe: vec!["#".to_owned()],
        }
    }

    /// May the device publish to `topic` (a topic name, no wildcards)?
    pub fn may_publish(&self, topic: &str) -> bool {
        !topic.contains(['+', '#']) && self.publish.iter().any(|p| covers(p, topic))
    }

    /// May the device subscribe to `filter`: is every topic it matches allowed?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|p| covers(p, filter))
    }
}

/// Does pattern `pattern` match every topic that `filter` matches? With a plain topic as
/// `filter` this is ordinary MQTT matching.
fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(id: &str) -> Acl {
        Acl::for_device(&MqttAclConfig::default(), id)
    }

    #[test]
    fn default_publish_is_the_device_prefix() {
        let a = acl("dev-1");
        assert!(a.may_publish("devices/dev-1/temp"));
        assert!(a.may_publish("devices/dev-1/a/b"));
        assert!(!a.may_publish("devices/dev-2/temp"));
        // MQTT: `a/#` also matches `a`.
        assert!(a.may_publish("devices/dev-1"));
        assert!(!a.may_publish("devices/dev-1/+"));
        assert!(!a.may_publish("other"));
    }

    #[test]
    fn subscribe_filters_must_stay_inside_the_pattern() {
        let a = acl("dev-1");
        assert!(a.may_subscribe("devices/dev-1/commands/#"));
        assert!(a.may_subscribe("devices/dev-1/commands/+"));
        assert!(a.may_subscribe("devices/dev-1/commands/x"));
        assert!(!a.may_subscribe("devices/dev-1/#"));
        assert!(!a.may_subscribe("devices/+/commands/#"));
        assert!(!a.may_subscribe("#"));
        assert!(!a.may_subscribe("devices/dev-2/commands/#"));
    }

    #[test]
    fn plus_in_a_pattern_covers_plus_but_not_hash() {
        let config = MqttAclConfig {
            publish: vec![],
            subscribe: vec!["devices/+/telemetry".into()],
        };
        let a = Acl::for_device(&config, "d");
        assert!(a.may_subscribe("devices/+/telemetry"));
        assert!(a.may_subscribe("devices/x/telemetry"));
        assert!(!a.may_subscribe("devices/#"));
        assert!(!a.may_publish("devices/x/telemetry"));
    }
}

//! The MQTT server (crate `outpost-mqtt`, `daemon/mqtt/`) wired to the gateway: who a client
//! is comes from the registry, a publish becomes an outbox record, subscriptions and command
//! deliveries reach the local bus. The server's own contract (CONNECT, sessions, acks after
//! the commit, QoS 2, deliveries) is stated in `daemon/mqtt/src/connection.rs`.
//!
//! Identities:
//! - user name = device id, password = its secret (argon2id, checked by the registry; an
//!   unknown device costs the same time as a wrong secret);
//! - a verified TLS client certificate whose subject CN or a SAN DNS name is a device id
//!   (`[mqtt.tls]`): with a user name, the name must be one of the certificate's; without one,
//!   the first name that is a registered device;
//! - with `mqtt.allow_anonymous`, a CONNECT without credentials is `anonymous/<client id>`
//!   (never a registered id: those have no `/`), whose ACL prefix follows from it.
//!
//! Revocation: every PUBLISH and SUBSCRIBE checks that the device is still enabled, still
//! allowed MQTT and — for a password login — still has the secret it logged in with. A device
//! disabled, deleted or rotated through the API is refused from its next packet on, and its
//! connection closed; idle connections are checked every half second.
//!
//! Acknowledgements of commands (`devices/<id>/acks/<command id>`, see `ingress::bus`) go to the
//! registry, not the outbox.
//!
//! Records: route `mqtt.route`, headers `mqtt_qos`, `mqtt_retain` (when set), `mqtt_will`
//! (`true` for a will the server published), then an MQTT 5 publish's user properties in
//! order; its content type as the record's content type.

use std::sync::Arc;

use outpost_config::MqttAclConfig;
use outpost_mqtt::acl::Acl;
use outpost_mqtt::backend::{
    AuthRefusal, Backend, BoxFuture, Credentials, Identity, Observation, Record, StoreRefusal,
};
use outpost_sync::{AppendError, Source};

use super::{Ingest, IngestRecord};
use crate::registry::commands::Acked;
use crate::registry::{Protocol, Refusal, Registry, Traffic};

/// The global `[mqtt.acl]`, shared with the reload task.
pub type SharedAcl = Arc<std::sync::RwLock<MqttAclConfig>>;

/// The gateway's side of the MQTT server.
#[derive(Debug, Clone)]
pub struct GatewayBackend {
    ingest: Ingest,
    route: Arc<str>,
    allow_anonymous: bool,
    /// `[mqtt.acl]`, replaced by a reload (`reload`); read at each CONNECT.
    acl: SharedAcl,
    /// `apps.bus_subscribe` when apps are enabled, else empty.
    app_subscribe: Arc<[String]>,
}

impl GatewayBackend {
    pub fn new(ingest: Ingest, config: &outpost_config::Config) -> GatewayBackend {
        let app_subscribe: &[String] = if config.apps.enabled {
            &config.apps.bus_subscribe
        } else {
            &[]
        };
        GatewayBackend {
            ingest,
            route: Arc::from(config.mqtt.route.as_str()),
            allow_anonymous: config.mqtt.allow_anonymous,
            acl: Arc::new(std::sync::RwLock::new(config.mqtt.acl.clone())),
            app_subscribe: app_subscribe.into(),
        }
    }

    fn registry(&self) -> &Registry {
        self.ingest.registry()
    }

    /// The global ACL, for the reload task: a new one applies from each device's next CONNECT.
    pub fn acl(&self) -> SharedAcl {
        Arc::clone(&self.acl)
    }

    fn identity(&self, device_id: String, registered: bool, password: bool) -> Identity {
        let acl = {
            let global = self
                .acl
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            acl_for(&global, &self.app_subscribe, self.registry(), &device_id)
        };
        // Certificate logins carry no secret to revoke (0); anonymous clients none at all.
        let grant = if password {
            self.registry().credential_stamp(&device_id).unwrap_or(0)
        } else {
            0
        };
        Identity {
            device_id: Arc::from(device_id),
            acl,
            registered,
            grant,
        }
    }
}

impl GatewayBackend {
    /// A device's acknowledgement of command `command` (a PUBLISH on its ack topic): recorded
    /// in the registry instead of stored as a reading. The payload is the result: JSON when it
    /// parses as JSON, else its text. An unknown or expired command is acknowledged to the
    /// device all the same (there is nothing it could do) and logged.
    fn ack(
        &self,
        device_id: &str,
        command: i64,
        payload: &[u8],
    ) -> BoxFuture<'static, Result<u64, StoreRefusal>> {
        let result = serde_json::from_slice(payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
        });
        let (registry, device) = (self.registry().clone(), device_id.to_owned());
        Box::pin(async move {
            match registry.ack_command(&device, command, result).await {
                Ok(Acked::Ok(_)) => Ok(0),
                Ok(other) => {
                    tracing::info!(device = %device, command, outcome = ?other, "Acknowledgement of no deliverable command");
                    Ok(0)
                }
                Err(e) => Err(StoreRefusal::Unavailable(e.to_string())),
            }
        })
    }
}

/// The ACL of an MQTT identity: the device's own `mqtt_publish`/`mqtt_subscribe` from the
/// registry where it has them, else the `[mqtt.acl]` patterns; `app-<name>` devices tagged
/// `outpost-app` (the bus identities the apps subsystem creates) may also subscribe to
/// `apps.bus_subscribe`.
fn acl_for(
    mqtt: &outpost_config::MqttAclConfig,
    apps_subscribe: &[String],
    registry: &Registry,
    device_id: &str,
) -> Acl {
    let device = registry.get(device_id);
    let mut config = mqtt.clone();
    if let Some(d) = &device {
        // The device's own lists replace the global ones.
        if let Some(publish) = &d.mqtt_publish {
            config.publish.clone_from(publish);
        }
        if let Some(subscribe) = &d.mqtt_subscribe {
            config.subscribe.clone_from(subscribe);
        }
    }
    let is_app = device_id.starts_with("app-")
        && device
            .as_ref()
            .is_some_and(|d| d.tags.iter().any(|t| t == crate::apps::DEVICE_TAG));
    if is_app {
        config.subscribe.extend(apps_subscribe.iter().cloned());
    }
    Acl::for_device(&config, device_id)
}

fn refusal(r: Refusal) -> AuthRefusal {
    match r {
        Refusal::UnknownDevice | Refusal::BadSecret => AuthRefusal::BadCredentials,
        Refusal::Disabled | Refusal::ProtocolNotAllowed => AuthRefusal::NotAuthorized,
    }
}

/// The device a verified client certificate (its `names`) authenticates: `None` when the
/// certificate grants nothing (password authentication applies), else the device id or why it
/// is refused. See the module header for the rules.
pub fn certified_device(
    names: &[String],
    username: Option<&str>,
    registry: &Registry,
) -> Option<Result<String, Refusal>> {
    let candidate = match username {
        Some(user) => names.iter().find(|n| *n == user)?,
        None => names
            .iter()
            .find(|n| registry.identify(n, Protocol::Mqtt) != Err(Refusal::UnknownDevice))?,
    };
    Some(
        registry
            .identify(candidate, Protocol::Mqtt)
            .map(|()| candidate.clone()),
    )
}

impl Backend for GatewayBackend {
    fn authenticate<'a>(
        &'a self,
        c: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, AuthRefusal>> {
        Box::pin(async move {
            if let Some(certified) = certified_device(c.cert_names, c.username, self.registry()) {
                let id = certified.map_err(refusal)?;
                return Ok(self.identity(id, true, false));
            }
            if let Some(user) = c.username {
                // Device secrets are text; a password that is not UTF-8 cannot be one.
                let password = c
                    .password
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .unwrap_or("");
                return match self
                    .registry()
                    .authenticate(user, password, Protocol::Mqtt)
                    .await
                {
                    Ok(()) => Ok(self.identity(user.to_owned(), true, true)),
                    Err(r) => {
                        self.registry().observe(user, Traffic::Refused);
                        Err(refusal(r))
                    }
                };
            }
            let id = c.client_id;
            if self.allow_anonymous && !id.is_empty() && !id.contains(['/', '+', '#']) {
                return Ok(self.identity(format!("anonymous/{id}"), false, false));
            }
            Err(AuthRefusal::NotAuthorized)
        })
    }

    fn check(&self, identity: &Identity) -> Result<(), String> {
        if !identity.registered {
            return Ok(());
        }
        let registry = self.registry();
        registry
            .identify(&identity.device_id, Protocol::Mqtt)
            .map_err(|r| r.to_string())?;
        if identity.grant != 0
            && registry.credential_stamp(&identity.device_id) != Some(identity.grant)
        {
            return Err("the device's secret was rotated".to_owned());
        }
        Ok(())
    }

    fn store(
        &self,
        identity: &Identity,
        record: Record,
        key: Option<String>,
    ) -> BoxFuture<'static, Result<u64, StoreRefusal>> {
        if identity.registered
            && let Some(command) = super::bus::acked_command_id(&identity.device_id, &record.topic)
        {
            return self.ack(&identity.device_id, command, &record.payload);
        }
        let mut headers = Vec::with_capacity(3 + record.user.len());
        headers.push(("mqtt_qos".to_owned(), (record.qos as u8).to_string()));
        if record.retain {
            headers.push(("mqtt_retain".to_owned(), "true".to_owned()));
        }
        if record.will {
            headers.push(("mqtt_will".to_owned(), "true".to_owned()));
        }
        // The properties share the packet's buffer; the outbox record owns its copies.
        headers.extend(
            record
                .user
                .iter()
                .map(|(k, v)| (String::from(&**k), String::from(&**v))),
        );
        let record = IngestRecord {
            topic: record.topic.to_string(),
            content_type: record.content_type.as_deref().map(String::from),
            // A slice of the decoded packet's buffer: no copy until SQLite has it.
            payload: record.payload,
            headers,
        };
        let (ingest, route, device) = (
            self.ingest.clone(),
            Arc::clone(&self.route),
            Arc::clone(&identity.device_id),
        );
        Box::pin(async move {
            let result = match key {
                Some(key) => ingest.submit_once(&device, &route, record, key).await,
                None => ingest
                    .submit(&device, Source::Mqtt, &route, vec![record])
                    .await
                    .map(|seqs| seqs.first().copied().unwrap_or(0)),
            };
            result.map_err(|e| match e {
                AppendError::Full { .. } => StoreRefusal::Full(e.to_string()),
                AppendError::TooLarge { .. } | AppendError::UnknownRoute(_) => {
                    StoreRefusal::Never(e.to_string())
                }
                AppendError::Storage(_) | AppendError::Closed => {
                    StoreRefusal::Unavailable(e.to_string())
                }
                AppendError::Invalid { .. } => StoreRefusal::Invalid(e.to_string()),
            })
        })
    }

    fn release(&self, keys: Vec<String>) -> BoxFuture<'static, Result<(), String>> {
        let outbox = self.ingest.outbox().clone();
        Box::pin(async move {
            outbox
                .release_keys(keys, None)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn release_prefix(&self, prefix: String) -> BoxFuture<'static, Result<(), String>> {
        let outbox = self.ingest.outbox().clone();
        Box::pin(async move {
            outbox
                .release_keys(Vec::new(), Some(prefix))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn held_keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, String>> {
        let outbox = self.ingest.outbox().clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || outbox.held_keys(&prefix))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn observe(&self, device_id: &str, event: Observation) {
        let traffic = match event {
            // Stored publishes are accounted by `Ingest::submit`.
            Observation::Accepted { .. } => return,
            Observation::Malformed => Traffic::Malformed,
            Observation::Refused => Traffic::Refused,
        };
        self.registry().observe(device_id, traffic);
    }

    fn subscribed(&self, identity: &Identity) {
        if identity.registered {
            self.ingest.bus().subscribed(&identity.device_id);
        }
    }

    fn delivered(&self, identity: &Identity, topic: &str) {
        self.ingest.bus().relayed(&identity.device_id, topic);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn app_identities_get_the_apps_subscribe_filters_and_nobody_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let device = |id: &str, tags: Vec<String>| crate::registry::NewDevice {
            id: id.into(),
            name: String::new(),
            model: String::new(),
            batch: String::new(),
            firmware: String::new(),
            location: String::new(),
            tags,
            enabled: true,
            protocols: vec![Protocol::Mqtt],
            mqtt_publish: None,
            mqtt_subscribe: None,
        };
        let tag = vec![crate::apps::DEVICE_TAG.to_owned()];
        registry.create(device("app-f", tag)).await.unwrap();
        // Named like an app but not one: an ordinary device.
        registry.create(device("app-x", vec![])).await.unwrap();
        registry.create(device("d1", vec![])).await.unwrap();
        let mqtt = outpost_config::MqttAclConfig::default();
        let apps = ["devices/+/#".to_owned()];
        let app = acl_for(&mqtt, &apps, &registry, "app-f");
        assert!(app.may_subscribe("devices/+/#"));
        assert!(app.may_subscribe("devices/d1/http/temp"));
        assert!(!app.may_subscribe("#"));
        assert!(!app.may_publish("devices/d1/x"), "publish ACL unchanged");
        for id in ["app-x", "d1"] {
            let acl = acl_for(&mqtt, &apps, &registry, id);
            assert!(!acl.may_subscribe("devices/+/#"), "{id}");
            assert!(acl.may_subscribe(&format!("devices/{id}/commands/#")));
        }
    }

    #[tokio::test]
    async fn a_device_s_own_acl_lists_replace_the_global_ones() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        for (id, publish) in [
            ("own", Some(vec!["plant/{id}/#".to_owned()])),
            ("plain", None),
        ] {
            let new: crate::registry::NewDevice =
                serde_json::from_value(serde_json::json!({ "id": id })).unwrap();
            registry
                .create(crate::registry::NewDevice {
                    mqtt_publish: publish,
                    ..new
                })
                .await
                .unwrap();
        }
        let mqtt = outpost_config::MqttAclConfig::default();
        let own = acl_for(&mqtt, &[], &registry, "own");
        assert!(own.may_publish("plant/own/temp"));
        assert!(!own.may_publish("devices/own/temp"), "replaced, not added");
        assert!(
            own.may_subscribe("devices/own/commands/#"),
            "subscribe: global"
        );
        let plain = acl_for(&mqtt, &[], &registry, "plain");
        assert!(!plain.may_publish("plant/plain/temp"));
        assert!(plain.may_publish("devices/plain/temp"));
    }
}

//! The librdkafka side: producer settings that keep the contract, and a context that reports
//! broker reachability to the forwarder.
//!
//! # Why these settings
//!
//! * `acks=all`, `enable.idempotence=true`: a delivery report means every in-sync replica has
//!   the record, and librdkafka's retries neither duplicate nor reorder within a partition.
//! * `message.timeout.ms=0` (infinite) in at-least-once mode: librdkafka never expires a record
//!   during an outage; the forwarder bounds how many it hands over (`max_in_flight`) and the
//!   rest waits in the outbox. A transactional producer cannot have an infinite message timeout
//!   (it must not exceed `transaction.timeout.ms`), so in exactly-once mode records expire with
//!   their transaction, which is then aborted and sent again from the outbox.
//! * `reconnect.backoff.ms`/`reconnect.backoff.max.ms` from the config: librdkafka doubles the
//!   wait per attempt up to the maximum and adds ±20 % jitter itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use outpost_config::{KafkaConfig, SecurityProtocol};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::ProducerContext;

use super::tls_check::TlsCheck;

/// What the librdkafka threads tell the forwarder.
#[derive(Debug, Default)]
pub struct LinkSignals {
    /// Set when librdkafka reports that every broker is down; cleared on the next delivery.
    pub all_brokers_down: AtomicBool,
    /// The last error librdkafka reported, for the status.
    last_error: std::sync::Mutex<Option<String>>,
    /// Why a broker's certificate was refused ([`super::tls_check`]), shown with `last_error`.
    tls_reason: std::sync::Mutex<Option<String>>,
}

impl LinkSignals {
    pub fn set_error(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }

    pub fn set_tls_reason(&self, reason: String) {
        if let Ok(mut last) = self.tls_reason.lock() {
            *last = Some(reason);
        }
    }

    /// The last error, with the certificate check's verdict when there is one.
    pub fn last_error(&self) -> Option<String> {
        let error = self.last_error.lock().ok()?.clone()?;
        match self.tls_reason.lock().ok().and_then(|r| r.clone()) {
            Some(reason) => Some(format!("{error} (certificate check: {reason})")),
            None => Some(error),
        }
    }

    /// Kafka is reachable again: the status no longer shows the outage's error.
    pub fn clear_error(&self) {
        for slot in [&self.last_error, &self.tls_reason] {
            if let Ok(mut last) = slot.lock() {
                *last = None;
            }
        }
    }
}

/// The producer's context: librdkafka's errors and logs go to tracing and to [`LinkSignals`].
#[derive(Debug, Clone)]
pub struct Context {
    pub signals: Arc<LinkSignals>,
    /// Says why a broker's certificate was refused (TLS only).
    pub tls_check: Option<Arc<TlsCheck>>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::info!(facility = fac, "librdkafka: {message}");
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.signals.all_brokers_down.store(true, Ordering::Relaxed);
        }
        tracing::debug!(%error, reason, "Kafka client error");
        if let Some(check) = &self.tls_check {
            check.after_error(reason, &self.signals);
        }
        self.signals.set_error(format!("{error}: {reason}"));
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// librdkafka settings for the producer. `transactional_id` switches on exactly-once mode.
pub fn producer_config(
    kafka: &KafkaConfig,
    client_id: &str,
    transactional_id: Option<&str>,
) -> Result<ClientConfig, String> {
    let mut c = common_config(kafka, client_id)?;
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", kafka.compression.as_str())
        .set("linger.ms", kafka.linger.as_millis().to_string())
        // librdkafka's own queue; the forwarder's window (`max_in_flight`) is the real bound.
        .set(
            "queue.buffering.max.messages",
            (kafka.max_in_flight + 1000).min(10_000_000).to_string(),
        )
        .set("queue.buffering.max.kbytes", "16384")
        // Records for a topic the cluster does not have are held this long (a new topic may
        // take a moment to appear), then fail with "unknown topic": a poison record.
        .set(
            "topic.metadata.propagation.max.ms",
            kafka
                .dead_letter
                .unknown_topic_timeout
                .as_millis()
                .to_string(),
        );
    match transactional_id {
        None => {
            c.set("message.timeout.ms", "0");
        }
        Some(id) => {
            c.set("transactional.id", id)
                .set("transaction.timeout.ms", "60000")
                .set("message.timeout.ms", "55000");
        }
    }
    Ok(c)
}

/// Settings shared by the producer and the consumers of the fleet and checkpoint topics.
pub fn common_config(kafka: &KafkaConfig, client_id: &str) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka.brokers.join(","))
        .set("client.id", client_id)
        .set(
            "reconnect.backoff.ms",
            kafka.reconnect_backoff_min.as_millis().to_string(),
        )
        .set(
            "reconnect.backoff.max.ms",
            kafka.reconnect_backoff_max.as_millis().to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Warning);
    let s = &kafka.security;
    c.set("security.protocol", s.protocol.as_str());
    if let Some(mechanism) = s.sasl_mechanism {
        c.set("sasl.mechanism", mechanism.as_str());
    }
    if let Some(user) = &s.username {
        c.set("sasl.username", user);
    }
    let password = match (&s.password, &s.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| {
                    format!(
                        "kafka.security.password_file: cannot read {}: {e}",
                        file.display()
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(password) = password {
        c.set("sasl.password", password);
    }
    if matches!(
        s.protocol,
        SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
    ) {
        if let Some(ca) = &s.ca_file {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        if let Some(cert) = &s.cert_file {
            c.set("ssl.certificate.location", cert.display().to_string());
        }
        if let Some(key) = &s.key_file {
            c.set("ssl.key.location", key.display().to_string());
        }
    }
    for (key, value) in &kafka.properties {
        c.set(key, value);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use outpost_config::{Compression, SaslMechanism};
    use rdkafka::producer::BaseProducer;

    use super::*;

    /// librdkafka refuses, at producer creation, a mechanism or codec it was built without: this
    /// proves the bundled build has TLS, every SASL mechanism we document, zstd and lz4.
    #[test]
    fn the_bundled_librdkafka_accepts_every_documented_security_and_codec_setting() {
        for (protocol, mechanism) in [
            (SecurityProtocol::SaslSsl, SaslMechanism::ScramSha512),
            (SecurityProtocol::SaslSsl, SaslMechanism::ScramSha256),
            (SecurityProtocol::SaslPlaintext, SaslMechanism::Plain),
            (SecurityProtocol::SaslSsl, SaslMechanism::OauthBearer),
        ] {
            for compression in [Compression::Zstd, Compression::Lz4, Compression::Gzip] {
                let mut kafka = KafkaConfig {
                    compression,
                    ..KafkaConfig::default()
                };
                kafka.security.protocol = protocol;
                kafka.security.sasl_mechanism = Some(mechanism);
                if mechanism != SaslMechanism::OauthBearer {
                    kafka.security.username = Some("gw".into());
                    kafka.security.password = Some("secret".into());
                }
                let config =
                    producer_config(&kafka, "outpost-test", None).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(config.get("acks"), Some("all"));
                assert_eq!(config.get("enable.idempotence"), Some("true"));
                assert_eq!(config.get("message.timeout.ms"), Some("0"));
                let created: Result<BaseProducer, _> = config.create();
                assert!(
                    created.is_ok(),
                    "{protocol:?} {mechanism:?} {compression:?}: {:?}",
                    created.err()
                );
            }
        }
    }

    /// librdkafka's own OIDC token fetch needs libcurl, linked only with the `kafka-oidc`
    /// feature; without it, asking for it fails when the producer is created, naming libcurl.
    #[test]
    fn oidc_token_fetch_needs_the_kafka_oidc_feature() {
        let mut kafka = KafkaConfig::default();
        kafka.security.protocol = SecurityProtocol::SaslSsl;
        kafka.security.sasl_mechanism = Some(SaslMechanism::OauthBearer);
        kafka.properties = [
            ("sasl.oauthbearer.method", "oidc"),
            ("sasl.oauthbearer.client.id", "gw"),
            ("sasl.oauthbearer.client.secret", "secret"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://127.0.0.1:1/token",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let config =
            producer_config(&kafka, "outpost-test", None).unwrap_or_else(|e| panic!("{e}"));
        let created: Result<BaseProducer, _> = config.create();
        if cfg!(feature = "kafka-oidc") {
            assert!(created.is_ok(), "{:?}", created.err());
        } else {
            let error = created.err().expect("refused without libcurl").to_string();
            assert!(error.contains("libcurl"), "{error}");
        }
    }

    #[test]
    fn transactional_producers_get_a_finite_message_timeout() {
        let config = producer_config(&KafkaConfig::default(), "c", Some("outpost-gw"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.get("transactional.id"), Some("outpost-gw"));
        assert_eq!(config.get("message.timeout.ms"), Some("55000"));
    }
}

//! Secured Kafka end to end: the real `outpost` binary forwards to a real broker (tansu) behind a
//! real TLS terminator (Debian's stunnel, certificates from Debian's `openssl`), the way managed
//! Kafka services are reached: TLS with a private CA and hostname verification, mutual TLS, and
//! SASL/SCRAM-SHA-256 and -512 over TLS (tansu checks SCRAM proofs; it offers no PLAIN that
//! checks a password, see docs/KAFKA.md). Records are read back with an rdkafka consumer over
//! the same security. Once the settings are right, the gateway also reads a command from the
//! commands topic over the same security (a backend's confluent-kafka producer sends it) and
//! answers it on the status topic.
//!
//! Every wrong setting (CA, host name, client certificate, password) must show its reason in
//! `/api/v1/status` and the log, lose nothing, and the records must arrive once the config is
//! fixed and the daemon restarted.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_e2e::admin::{Device, admin_token_config};
use outpost_e2e::daemon::{Daemon, write_config};
use outpost_e2e::kafka::{Tansu, TansuSetup, consume_with, free_port, send_commands_with};
use outpost_e2e::stunnel::Stunnel;
use outpost_e2e::tls::Ca;

const TOPIC: &str = "outpost.readings";
const COMMANDS: &str = "outpost.commands";
const STATUS: &str = "outpost.command-status";
/// Appended to a config: the gateway reads commands too.
const WITH_COMMANDS: &str = "\n[kafka.commands]\nenabled = true\n";

/// A certificate and its key.
type Pair = (PathBuf, PathBuf);

/// The test PKI: the private CA with a broker certificate for localhost, one for another host
/// name and a client certificate, and a second CA nobody trusts.
struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    rogue: Ca,
    broker: Pair,
    other_name: Pair,
    client: Pair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let rogue = Ca::new(dir.path(), "rogue");
        let broker = ca.issue("broker", "kafka", "IP:127.0.0.1,DNS:localhost");
        let other_name = ca.issue("other-name", "kafka", "DNS:kafka.example");
        let client = ca.issue("client", "gateway-1", "");
        Pki {
            _dir: dir,
            ca,
            rogue,
            broker,
            other_name,
            client,
        }
    }
}

/// tansu reachable only over TLS, at localhost:`port` (stunnel in front of it; tansu advertises
/// stunnel's address, so every connection goes through it). By name, as a gateway reaches a
/// managed service, so the host name check is the usual one.
struct SecuredBroker {
    _tansu: Tansu,
    stunnel: Stunnel,
    port: u16,
}

impl SecuredBroker {
    fn start(cert: &Pair, client_ca: Option<&Path>, setup: TansuSetup) -> SecuredBroker {
        let port = free_port();
        let tansu = Tansu::start_with(
            &[(TOPIC, 1), (COMMANDS, 1), (STATUS, 1)],
            TansuSetup {
                advertised: Some(format!("localhost:{port}")),
                ..setup
            },
        );
        let stunnel = Stunnel::start(port, tansu.port(), &cert.0, &cert.1, client_ca);
        SecuredBroker {
            _tansu: tansu,
            stunnel,
            port,
        }
    }

    fn bootstrap(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

/// The daemon's config: Kafka at `broker` with the `[kafka.security]` lines given.
fn config(broker: &SecuredBroker, security: &str) -> String {
    format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\nlinger = \"2ms\"\n\
         reconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"1s\"\n\n\
         [kafka.security]\n{security}\n",
        admin_token_config(),
        broker.bootstrap()
    )
}

/// `[kafka.security]` for TLS with the private CA (and a client certificate).
fn tls(ca: &Ca, client: Option<&Pair>) -> String {
    let mut lines = format!(
        "protocol = \"ssl\"\nca_file = \"{}\"\n",
        ca.cert().display()
    );
    if let Some((cert, key)) = client {
        lines.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    lines
}

/// Starts the daemon on `dir` (its data kept across restarts) with `config`.
fn start(dir: &Path, config: &str) -> Daemon {
    Daemon::start_with(&write_config(dir, config), dir.join("data"))
}

/// Waits until the status shows a Kafka error containing `reason`, and checks that the log says
/// it too; returns the status's error.
fn wait_for_reason(d: &mut Daemon, reason: &str) -> String {
    d.wait_until(
        &format!("last_error with {reason:?}"),
        Duration::from_secs(20),
        |d| {
            d.status()["kafka"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(reason))
        },
    );
    let error = d.status()["kafka"]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    // The log names the reason too (read by another thread: wait for it).
    d.wait_for_log(reason, Duration::from_secs(5));
    error
}

/// Nothing was lost while Kafka refused the gateway: every record is still in the outbox.
fn assert_held(d: &Daemon, records: u64) {
    assert_eq!(
        d.metric("outpost_outbox_records"),
        records as f64,
        "{}",
        d.status()
    );
}

fn wait_delivered(d: &mut Daemon) {
    d.wait_until("delivered", Duration::from_secs(60), |d| {
        d.metric("outpost_outbox_records") == 0.0
            && d.status()["kafka"]["in_flight"].as_u64() == Some(0)
    });
}

/// A backend's librdkafka settings for the broker: TLS with the private CA and the client
/// certificate, then `client`'s (which may override them, e.g. SASL).
fn backend_settings(pki: &Pki, client: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut settings = vec![
        (
            "ssl.ca.location".to_owned(),
            pki.ca.cert().display().to_string(),
        ),
        (
            "ssl.certificate.location".to_owned(),
            pki.client.0.display().to_string(),
        ),
        (
            "ssl.key.location".to_owned(),
            pki.client.1.display().to_string(),
        ),
        ("security.protocol".to_owned(), "ssl".to_owned()),
    ];
    settings.extend(
        client
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    settings
}

fn as_pairs(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Reads the topic back over TLS (with `client` settings added) and checks it holds each of
/// `device`'s records `0..count` once.
fn assert_topic_holds(
    broker: &SecuredBroker,
    pki: &Pki,
    client: &[(&str, &str)],
    device: &str,
    count: u64,
) {
    let settings = backend_settings(pki, client);
    let got = consume_with(
        &broker.bootstrap(),
        TOPIC,
        count as usize + 1,
        Duration::from_secs(15),
        &as_pairs(&settings),
    );
    let mut counters: Vec<u64> = got
        .iter()
        .filter(|r| r.header("outpost-device").as_deref() == Some(device))
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["n"].as_u64().unwrap()
        })
        .collect();
    counters.sort_unstable();
    assert_eq!(
        counters,
        (0..count).collect::<Vec<_>>(),
        "{}",
        broker.stunnel.log()
    );
}

/// A backend sends a command for `device` over the broker's security (`client` settings added,
/// as in [`assert_topic_holds`]); the gateway (configured [`WITH_COMMANDS`]) reads it over its
/// own, queues it, and its `queued` event comes back on the status topic.
fn assert_commands_flow(
    d: &mut Daemon,
    broker: &SecuredBroker,
    pki: &Pki,
    client: &[(&str, &str)],
    device: &str,
) {
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let settings = backend_settings(pki, client);
    let id = format!("secured-{device}");
    send_commands_with(
        &broker.bootstrap(),
        COMMANDS,
        &[(
            gateway.as_str(),
            serde_json::json!({"id": id, "device": device, "name": "ping"}),
        )],
        Duration::ZERO,
        &as_pairs(&settings),
    );
    d.wait_until("the command read", Duration::from_secs(30), |d| {
        d.metric("outpost_kafka_commands_read_total") == 1.0
    });
    let events = consume_with(
        &broker.bootstrap(),
        STATUS,
        1,
        Duration::from_secs(30),
        &as_pairs(&settings),
    );
    let statuses: Vec<serde_json::Value> = events
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect();
    assert!(
        statuses.iter().any(|e| e["command_id"] == id.as_str()
            && e["status"] == "queued"
            && e["device"] == device),
        "{statuses:#?}"
    );
}

/// TLS with a private CA and hostname verification (librdkafka's default): an untrusted CA and a
/// certificate for another host name are each refused with their reason (librdkafka says only
/// "certificate verify failed" for both; Outpost's certificate check adds which), nothing is
/// lost, and the records arrive once the config points at the right CA and broker.
#[test]
fn tls_with_a_private_ca_checks_the_ca_and_the_host_name() {
    let pki = Pki::new();
    let broker = SecuredBroker::start(&pki.broker, None, TansuSetup::default());
    let dir = tempfile::tempdir().unwrap();

    // An untrusted CA.
    let mut d = start(dir.path(), &config(&broker, &tls(&pki.rogue, None)));
    let mut dev = Device::new(&d, "tls-1");
    dev.send(&d, TOPIC, 5);
    let error = wait_for_reason(&mut d, "unable to get local issuer certificate");
    assert!(error.contains("certificate verify failed"), "{error}");
    assert_held(&d, 5);
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    // A broker whose certificate names another host: the same CA, refused by the host check.
    let other = SecuredBroker::start(&pki.other_name, None, TansuSetup::default());
    let mut d = start(dir.path(), &config(&other, &tls(&pki.ca, None)));
    dev.send(&d, TOPIC, 5);
    let error = wait_for_reason(&mut d, "hostname mismatch");
    assert!(
        error.contains("the certificate is for DNS:kafka.example"),
        "the reason names the certificate's names: {error}"
    );
    assert_held(&d, 10);
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    // Fixed: the right CA and the right broker. Everything arrives, once.
    let mut d = start(dir.path(), &config(&broker, &tls(&pki.ca, None)));
    wait_delivered(&mut d);
    dev.send(&d, TOPIC, 5);
    wait_delivered(&mut d);
    assert_eq!(d.status()["kafka"]["last_error"], serde_json::Value::Null);
    assert_topic_holds(&broker, &pki, &[], "tls-1", 15);
}

/// Mutual TLS: a broker that requires a client certificate refuses a gateway without one, with
/// the reason; with the certificate configured, everything arrives once.
#[test]
fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let broker = SecuredBroker::start(&pki.broker, Some(&pki.ca.cert()), TansuSetup::default());
    let dir = tempfile::tempdir().unwrap();

    let mut d = start(dir.path(), &config(&broker, &tls(&pki.ca, None)));
    let mut dev = Device::new(&d, "mtls-1");
    dev.send(&d, TOPIC, 5);
    wait_for_reason(&mut d, "certificate required");
    assert_held(&d, 5);
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    let security = tls(&pki.ca, Some(&pki.client));
    let mut d = start(dir.path(), &(config(&broker, &security) + WITH_COMMANDS));
    wait_delivered(&mut d);
    dev.send(&d, TOPIC, 5);
    wait_delivered(&mut d);
    assert_topic_holds(&broker, &pki, &[], "mtls-1", 10);
    assert_commands_flow(&mut d, &broker, &pki, &[], "mtls-1");
    assert!(
        broker.stunnel.log().contains("Certificate accepted"),
        "stunnel checked the client certificate: {}",
        broker.stunnel.log()
    );
}

/// SASL/SCRAM-SHA-256 and SCRAM-SHA-512 over TLS against a broker that checks the proof: a wrong
/// password is refused with the reason and loses nothing; the right credentials of either
/// mechanism deliver everything once.
#[test]
fn sasl_scram_over_tls_checks_the_password() {
    let pki = Pki::new();
    let broker = SecuredBroker::start(
        &pki.broker,
        None,
        TansuSetup {
            sqlite: true,
            scram_users: vec![
                ("scram256", "alice", "alice-secret"),
                ("scram512", "bob", "bob-secret"),
            ],
            ..TansuSetup::default()
        },
    );
    let sasl = |mechanism: &str, user: &str, password: &str| {
        format!(
            "protocol = \"sasl_ssl\"\nca_file = \"{}\"\nsasl_mechanism = \"{mechanism}\"\n\
             username = \"{user}\"\npassword = \"{password}\"\n",
            pki.ca.cert().display()
        )
    };
    let dir = tempfile::tempdir().unwrap();

    let mut d = start(
        dir.path(),
        &config(&broker, &sasl("SCRAM-SHA-256", "alice", "not-her-secret")),
    );
    let mut dev = Device::new(&d, "scram-1");
    dev.send(&d, TOPIC, 5);
    wait_for_reason(&mut d, "SASL SCRAM authentication failed");
    assert_held(&d, 5);
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    let mut d = start(
        dir.path(),
        &config(&broker, &sasl("SCRAM-SHA-256", "alice", "alice-secret")),
    );
    wait_delivered(&mut d);
    dev.send(&d, TOPIC, 5);
    wait_delivered(&mut d);
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    let mut d = start(
        dir.path(),
        &(config(&broker, &sasl("SCRAM-SHA-512", "bob", "bob-secret")) + WITH_COMMANDS),
    );
    dev.send(&d, TOPIC, 5);
    wait_delivered(&mut d);
    let bob = [
        ("security.protocol", "sasl_ssl"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "bob"),
        ("sasl.password", "bob-secret"),
    ];
    assert_topic_holds(&broker, &pki, &bob, "scram-1", 15);
    assert_commands_flow(&mut d, &broker, &pki, &bob, "scram-1");
}

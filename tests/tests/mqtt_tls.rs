//! The MQTT front's TLS listener against the real binary: certificates made at test time with
//! Debian's `openssl` CLI (a CA, a server certificate for 127.0.0.1/localhost, device client
//! certificates), `mosquitto_pub` over TLS with a password and with a client certificate.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, outpost_cli, write_config};
use outpost_e2e::tls::Ca;
use outpost_sync::{OutboxReader, StoredRecord};

/// A CA, a server certificate for 127.0.0.1/localhost and the `[mqtt.tls]` table using them
/// (client certificates from the same CA, `client_auth` as given).
fn pki(dir: &Path, client_auth: &str) -> (Ca, String) {
    let ca = Ca::new(dir, "ca");
    let (cert, key) = ca.issue("server", "outpost-test", "IP:127.0.0.1,DNS:localhost");
    let table = format!(
        "[mqtt.tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\n\
         key_file = \"{}\"\nclient_ca_file = \"{}\"\nclient_auth = \"{client_auth}\"\n",
        cert.display(),
        key.display(),
        ca.cert().display()
    );
    (ca, table)
}

/// Starts the daemon with `tls_table`: (daemon, TLS address).
fn start(dir: &Path, tls_table: &str) -> (Daemon, SocketAddr) {
    let mut d = Daemon::start(dir, &format!("{}\n{tls_table}", admin_token_config()));
    let line = d.wait_for_log("MQTT TLS listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (d, v["addr"].as_str().unwrap().parse().unwrap())
}

fn records(d: &Daemon) -> Vec<StoredRecord> {
    OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap()
}

/// `mosquitto_pub` of one QoS 1 message to `addr` with `args` (TLS and login options).
fn publish(addr: SocketAddr, topic: &str, message: &str, args: &[&str]) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-q", "1", "-t", topic, "-m", message, "-i", "tls-test"])
        .args(args)
        .output()
        .expect("run mosquitto_pub")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn password_and_client_certificate_logins_over_tls_store_records() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = pki(dir.path(), "optional");
    let (d, addr) = start(dir.path(), &tls);
    let secret = create_device(&d, "sensor-1", None);
    create_device(&d, "sensor-2", None);
    let cafile = ca.cert();
    let tls_args = ["--cafile", path(&cafile)];

    // User name and password over TLS, no client certificate.
    let out = publish(
        addr,
        "devices/sensor-1/pw",
        "by-password",
        &[&tls_args[..], &["-u", "sensor-1", "-P", &secret]].concat(),
    );
    assert!(out.status.success(), "password over TLS: {}", stderr(&out));

    // A client certificate naming sensor-2 (CN), no user name, no password.
    let (cert, key) = ca.issue("sensor-2", "sensor-2", "");
    let cert_args = [&tls_args[..], &["--cert", path(&cert), "--key", path(&key)]].concat();
    let out = publish(addr, "devices/sensor-2/cert", "by-cn", &cert_args);
    assert!(out.status.success(), "client certificate: {}", stderr(&out));
    // With the matching user name (and no password) too.
    let out = publish(
        addr,
        "devices/sensor-2/cert-user",
        "by-cn-and-user",
        &[&cert_args[..], &["-u", "sensor-2"]].concat(),
    );
    assert!(
        out.status.success(),
        "certificate + user name: {}",
        stderr(&out)
    );
    // Another device's user name: the certificate grants nothing, the missing password fails.
    let out = publish(
        addr,
        "devices/sensor-1/x",
        "wrong-user",
        &[&cert_args[..], &["-u", "sensor-1"]].concat(),
    );
    assert!(!out.status.success(), "certificate used for another device");

    // A SAN DNS name naming sensor-1 (the CN names no device).
    let (cert, key) = ca.issue("by-san", "not-a-device", "DNS:sensor-1");
    let out = publish(
        addr,
        "devices/sensor-1/san",
        "by-san",
        &[&tls_args[..], &["--cert", path(&cert), "--key", path(&key)]].concat(),
    );
    assert!(out.status.success(), "SAN DNS name: {}", stderr(&out));

    // A valid certificate for a device that is not registered: refused.
    let (cert, key) = ca.issue("ghost", "ghost-9", "");
    let out = publish(
        addr,
        "devices/ghost-9/x",
        "ghost",
        &[&tls_args[..], &["--cert", path(&cert), "--key", path(&key)]].concat(),
    );
    assert!(
        !out.status.success(),
        "unknown device's certificate accepted"
    );
    assert!(stderr(&out).contains("not authori"), "{}", stderr(&out));

    // A certificate from another CA fails the handshake.
    let rogue = Ca::new(dir.path(), "rogue");
    let (cert, key) = rogue.issue("rogue-leaf", "sensor-2", "");
    let out = publish(
        addr,
        "devices/sensor-2/rogue",
        "rogue",
        &[&tls_args[..], &["--cert", path(&cert), "--key", path(&key)]].concat(),
    );
    assert!(
        !out.status.success(),
        "certificate of a foreign CA accepted"
    );

    // Plain MQTT on the TLS port fails.
    let out = publish(
        addr,
        "devices/sensor-1/plain",
        "plain",
        &["-u", "sensor-1", "-P", &secret],
    );
    assert!(!out.status.success(), "plain MQTT on the TLS port");

    let recs = records(&d);
    let mut got: Vec<(&str, &str, &[u8])> = recs
        .iter()
        .map(|r| (r.device_id.as_str(), r.topic.as_str(), r.payload.as_slice()))
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            ("sensor-1", "devices/sensor-1/pw", b"by-password".as_slice()),
            ("sensor-1", "devices/sensor-1/san", b"by-san".as_slice()),
            ("sensor-2", "devices/sensor-2/cert", b"by-cn".as_slice()),
            (
                "sensor-2",
                "devices/sensor-2/cert-user",
                b"by-cn-and-user".as_slice()
            ),
        ]
    );
}

#[test]
fn required_client_auth_refuses_a_handshake_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = pki(dir.path(), "required");
    let (d, addr) = start(dir.path(), &tls);
    let secret = create_device(&d, "sensor-1", None);
    let cafile = ca.cert();
    let out = publish(
        addr,
        "devices/sensor-1/pw",
        "no-cert",
        &["--cafile", path(&cafile), "-u", "sensor-1", "-P", &secret],
    );
    assert!(!out.status.success(), "no client certificate accepted");
    let (cert, key) = ca.issue("sensor-1", "sensor-1", "");
    let out = publish(
        addr,
        "devices/sensor-1/cert",
        "cert",
        &[
            "--cafile",
            path(&cafile),
            "--cert",
            path(&cert),
            "--key",
            path(&key),
        ],
    );
    assert!(out.status.success(), "client certificate: {}", stderr(&out));
    let recs = records(&d);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].device_id, "sensor-1");
}

#[test]
fn unreadable_tls_files_are_config_errors_naming_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[mqtt.tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            garbage.display(),
            dir.path().join("missing.key").display(),
            dir.path().join("missing-ca.pem").display(),
        ),
    );
    for command in ["check-config", "run"] {
        let args = match command {
            "run" => vec!["run", "--config", path(&config)],
            _ => vec!["check-config", path(&config)],
        };
        let (code, _out, err) = outpost_cli(&args);
        assert_eq!(code, 78, "{command}: {err}");
        for key in [
            "mqtt.tls.cert_file",
            "mqtt.tls.key_file",
            "mqtt.tls.client_ca_file",
        ] {
            assert!(err.contains(key), "{command}: {key} not in {err}");
        }
    }
    // Enabled without the files: caught by the config layer.
    let config = write_config(dir.path(), "[mqtt.tls]\nenabled = true\n");
    let (code, _out, err) = outpost_cli(&["check-config", path(&config)]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("mqtt.tls.cert_file") && err.contains("mqtt.tls.key_file"),
        "{err}"
    );
}

//! MQTT acknowledged means durable (issue #4, "kill -9 under load"): 8 connections publish
//! QoS 1 (or QoS 2) as fast as the front acknowledges; the daemon is killed with SIGKILL at a
//! random moment; after a restart every message whose PUBACK (QoS 1) or PUBREC (QoS 2) reached
//! its client is in the outbox, none twice. Several cycles alternate the QoS.
//!
//! The clients speak MQTT 3.1.1 on plain sockets so they count exactly the acknowledgement the
//! contract is about: a library's "published" callback fires at PUBCOMP for QoS 2, which would
//! test a weaker claim than "PUBREC means committed".

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::mqtt_raw::{mqtt_str, packet};
use outpost_sync::OutboxReader;
use rand::RngExt;

const CLIENTS: usize = 8;
const CYCLES: u32 = 10;

/// Reads one short packet: (first byte, body). `None` when the connection ends.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    assert!(head[1] < 128, "unexpected long packet {head:?}");
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

fn mqtt_addr(d: &mut Daemon) -> SocketAddr {
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["addr"].as_str().unwrap().parse().unwrap()
}

/// One publishing connection: publishes `cycle-client-n` at `qos` until the connection fails,
/// pushing the key of every message whose PUBACK / PUBREC arrived.
fn publisher(
    addr: SocketAddr,
    secret: &str,
    qos: u8,
    key_prefix: &str,
    acked: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let mut connect = Vec::new();
    mqtt_str(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 0xC2, 0, 60]); // level 4, user+password+clean, keep-alive 60
    mqtt_str(&mut connect, key_prefix);
    mqtt_str(&mut connect, "loader");
    mqtt_str(&mut connect, secret);
    if s.write_all(&packet(0x10, &connect)).is_err() {
        return;
    }
    match read_packet(&mut s) {
        Some((0x20, body)) => assert_eq!(body, [0, 0], "CONNACK refused"),
        _ => return, // killed before the CONNACK
    }
    for n in 0u16.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let pkid = n % 65000 + 1;
        let key = format!("{key_prefix}-{n}");
        let mut publish = Vec::new();
        mqtt_str(&mut publish, "devices/loader/load");
        publish.extend_from_slice(&pkid.to_be_bytes());
        publish.extend_from_slice(key.as_bytes());
        if s.write_all(&packet(0x30 | (qos << 1), &publish)).is_err() {
            return;
        }
        let expected = if qos == 1 { 0x40 } else { 0x50 };
        match read_packet(&mut s) {
            Some((kind, body)) if kind == expected && body == pkid.to_be_bytes() => {
                acked.lock().unwrap().push(key);
            }
            Some(other) => panic!("unexpected {other:?} for QoS {qos} publish {pkid}"),
            None => return, // the daemon was killed before the ack
        }
        if qos == 2 {
            if s.write_all(&packet(0x62, &pkid.to_be_bytes())).is_err() {
                return;
            }
            match read_packet(&mut s) {
                Some((0x70, _)) => {}
                Some(other) => panic!("expected PUBCOMP, got {other:?}"),
                None => return,
            }
        }
    }
}

#[test]
fn serial_mqtt_puback_and_pubrec_mean_committed_across_kill_9() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &admin_token_config());
    let secret = create_device(&d, "loader", None);
    let mut acknowledged: HashMap<u8, Vec<String>> = HashMap::new();
    let mut rng = rand::rng();
    for cycle in 0..CYCLES {
        let qos = if cycle % 2 == 0 { 1 } else { 2 };
        let addr = mqtt_addr(&mut d);
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (stop, acked, secret) = (Arc::clone(&stop), Arc::clone(&acked), secret.clone());
                std::thread::spawn(move || {
                    let prefix = format!("c{cycle}q{qos}n{client}");
                    publisher(addr, &secret, qos, &prefix, &acked, &stop);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        let this_cycle = std::mem::take(&mut *acked.lock().unwrap());
        assert!(
            !this_cycle.is_empty(),
            "cycle {cycle}: no acknowledgement at all"
        );
        acknowledged.entry(qos).or_default().extend(this_cycle);

        let stored = OutboxReader::open(&d.data_dir.join("outbox.db"))
            .unwrap()
            .read_all()
            .unwrap();
        let mut count: HashMap<String, usize> = HashMap::new();
        for r in &stored {
            *count
                .entry(String::from_utf8(r.payload.clone()).unwrap())
                .or_default() += 1;
        }
        for keys in acknowledged.values() {
            for key in keys {
                match count.get(key) {
                    Some(1) => {}
                    Some(n) => panic!("cycle {cycle}: {key} stored {n} times"),
                    None => panic!("cycle {cycle}: acknowledged {key} missing after kill -9"),
                }
            }
        }
        d = Daemon::start_with(&d.config_path.clone(), d.data_dir.clone());
    }
    for (qos, keys) in &acknowledged {
        eprintln!("QoS {qos}: {} acknowledged messages checked", keys.len());
        assert!(
            keys.len() > 300,
            "QoS {qos}: too little load to mean anything: {}",
            keys.len()
        );
    }
    d.terminate(Duration::from_secs(15));
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

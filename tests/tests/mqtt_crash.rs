//! MQTT acknowledged means durable, under `kill -9`:
//! - 8 connections publish QoS 1 (or QoS 2) as fast as the server acknowledges; the daemon is
//!   killed with SIGKILL at a random moment; after a restart every message whose PUBACK (QoS 1)
//!   or PUBREC (QoS 2) reached its client is in the outbox, none twice. Cycles alternate the QoS.
//! - Persistent sessions: MQTT 5 publishers with persistent sessions pipeline QoS 2 in windows
//!   of 16 and, after each kill, resume their sessions and retransmit with DUP; a persistent
//!   subscriber away all the while gets every acknowledged message from its queue on disk.
//!
//! The clients speak MQTT 3.1.1 on plain sockets so they count exactly the acknowledgement the
//! contract is about: a library's "published" callback fires at PUBCOMP for QoS 2, which would
//! test a weaker claim than "PUBREC means committed".

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::mqtt_raw::publish_until_closed;
use outpost_sync::OutboxReader;
use rand::RngExt;

const CLIENTS: usize = 8;
const CYCLES: u32 = 10;

fn mqtt_addr(d: &mut Daemon) -> SocketAddr {
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["addr"].as_str().unwrap().parse().unwrap()
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
                    publish_until_closed(
                        addr,
                        "loader",
                        &secret,
                        &prefix,
                        "devices/loader/load",
                        qos,
                        Duration::ZERO,
                        &acked,
                        &stop,
                    );
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

/// A publisher of the persistent-session test: MQTT 5, its own persistent session, QoS 2 in
/// pipelined windows; what was in flight when the daemon died is kept for the next connection.
struct Pipelined {
    client_id: String,
    next: u16,
    /// PUBLISH sent, PUBREC not seen: (packet id, key). Retransmitted with DUP on reconnect.
    unrecorded: Vec<(u16, String)>,
    /// PUBREC seen, PUBCOMP not: packet ids. PUBREL resent on reconnect.
    unreleased: Vec<u16>,
}

const WINDOW: usize = 16;

impl Pipelined {
    /// Runs until the connection fails; pushes the key of every publish whose PUBREC came.
    fn run(&mut self, addr: SocketAddr, secret: &str, cycle: u32, acked: &Mutex<Vec<String>>) {
        use outpost_e2e::mqtt_wire::{Connect, Next, Props, Wire, ack, publish};
        let connect = Connect::v5(&self.client_id)
            .clean(cycle == 0)
            .props(Props::new().u32(0x11, 3600))
            .login("loader", secret);
        let mut w = Wire::open(addr);
        w.send(&connect.encode());
        let Next::Packet(connack) = w.next(Duration::from_secs(5)) else {
            return;
        };
        assert_eq!(connack.connack().1, 0, "CONNACK refused");
        if cycle > 0 {
            assert!(
                connack.connack().0,
                "{}: session present after kill -9",
                self.client_id
            );
        }
        let empty = Props::new();
        // First what the last connection left unfinished: DUP publishes, PUBRELs.
        for (pkid, key) in &self.unrecorded {
            w.send(&publish(
                2,
                true,
                false,
                "devices/loader/load",
                *pkid,
                Some(&empty),
                key.as_bytes(),
            ));
        }
        for pkid in &self.unreleased {
            w.send(&ack(0x62, *pkid));
        }
        let mut pending_rec: std::collections::VecDeque<(u16, String)> =
            std::mem::take(&mut self.unrecorded).into();
        let mut pending_comp = self.unreleased.len();
        loop {
            // Fill the window.
            while pending_rec.len() < WINDOW {
                self.next = self.next % 65000 + 1;
                let key = format!("{}-{}-{}", self.client_id, cycle, self.next);
                w.send(&publish(
                    2,
                    false,
                    false,
                    "devices/loader/load",
                    self.next,
                    Some(&empty),
                    key.as_bytes(),
                ));
                pending_rec.push_back((self.next, key));
                self.unrecorded = pending_rec.iter().cloned().collect();
            }
            let Next::Packet(p) = w.next(Duration::from_secs(5)) else {
                self.unrecorded = pending_rec.into_iter().collect();
                return;
            };
            match p.kind() {
                5 => {
                    let (pkid, key) = pending_rec.pop_front().expect("a PUBREC for a PUBLISH");
                    assert_eq!(p.pkid(), pkid, "PUBRECs in the order of the publishes");
                    assert!(p.reason() < 0x80, "PUBREC {:#04x}", p.reason());
                    acked.lock().unwrap().push(key);
                    self.unreleased.push(pkid);
                    self.unrecorded = pending_rec.iter().cloned().collect();
                    w.send(&ack(0x62, pkid));
                    pending_comp += 1;
                }
                7 => {
                    // Success, or 0x92 for a PUBREL whose release committed before the kill.
                    assert!(
                        matches!(p.reason(), 0 | 0x92),
                        "PUBCOMP {:#04x}",
                        p.reason()
                    );
                    self.unreleased.retain(|id| *id != p.pkid());
                    pending_comp = pending_comp.saturating_sub(1);
                }
                other => panic!("unexpected packet type {other}: {p:?}"),
            }
        }
    }
}

/// Persistent sessions and exactly once across kill -9: an MQTT 5 subscriber with a
/// persistent session is away while 4 publishers (MQTT 5, persistent sessions) send QoS 2 in
/// pipelined windows of 16; the daemon is SIGKILLed at a random moment; after the restart the
/// publishers resume their sessions (session present), retransmit with DUP what had no PUBREC
/// and resend PUBREL for what had no PUBCOMP. Checked after every cycle: every publish that got
/// a PUBREC is in the outbox exactly once (DUPs across the restart included), and the
/// subscriber, back with Clean Start 0, receives every one of them from its queue on disk.
#[test]
fn serial_persistent_sessions_queued_messages_and_qos2_retransmissions_survive_kill_9() {
    use outpost_e2e::mqtt_wire::{Connect, Next, Props, Wire, ack, subscribe};
    const PUBLISHERS: usize = 4;
    const ROUNDS: u32 = 6;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[mqtt.sessions]\nmax_queued_messages = 1000000\n\
         max_queued_bytes = \"1GiB\"\n[mqtt.acl]\npublish = [\"devices/{{id}}/#\"]\n\
         subscribe = [\"devices/+/#\"]\n",
        admin_token_config()
    );
    let mut d = Daemon::start(dir.path(), &extra);
    let loader = create_device(&d, "loader", None);
    let sleeper = create_device(&d, "sleeper", None);
    let mut publishers: Vec<Pipelined> = (0..PUBLISHERS)
        .map(|n| Pipelined {
            client_id: format!("pub{n}"),
            next: 0,
            unrecorded: Vec::new(),
            unreleased: Vec::new(),
        })
        .collect();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut received: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut rng = rand::rng();
    // The subscriber comes back (Clean Start 0), drains its queue, and leaves again.
    let drain =
        |addr: SocketAddr, first: bool, received: &mut std::collections::HashSet<String>| {
            let connect = Connect::v5("sleeper")
                .clean(first)
                .props(Props::new().u32(0x11, 3600))
                .login("sleeper", &sleeper);
            let (mut w, connack) = Wire::connect(addr, &connect);
            assert_eq!(
                connack.connack(),
                (!first, 0),
                "subscriber CONNACK {connack:?}"
            );
            if first {
                w.send(&subscribe(
                    1,
                    Some(&Props::new()),
                    &[("devices/loader/#", 1)],
                ));
            }
            loop {
                match w.next(Duration::from_secs(2)) {
                    Next::Packet(p) if p.kind() == 3 => {
                        let m = p.publish(true);
                        w.send(&ack(0x40, m.pkid));
                        received.insert(String::from_utf8(m.payload).unwrap());
                    }
                    Next::Packet(p) if p.kind() == 9 => {}
                    Next::Packet(p) => panic!("subscriber got {p:?}"),
                    Next::Closed => panic!("subscriber connection closed"),
                    Next::Nothing => break,
                }
            }
            w.send(&[0xe0, 0]); // normal DISCONNECT: the session stays
            std::thread::sleep(Duration::from_millis(100));
        };
    for round in 0..ROUNDS {
        let addr = mqtt_addr(&mut d);
        drain(addr, round == 0, &mut received);
        for key in &acknowledged {
            assert!(
                received.contains(key),
                "round {round}: {key} acknowledged but never delivered to the persistent subscriber"
            );
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = std::mem::take(&mut publishers)
            .into_iter()
            .map(|mut p| {
                let (acked, secret) = (Arc::clone(&acked), loader.clone());
                std::thread::spawn(move || {
                    p.run(addr, &secret, round, &acked);
                    p
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        d.kill9();
        publishers = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let this_round = std::mem::take(&mut *acked.lock().unwrap());
        assert!(!this_round.is_empty(), "round {round}: no PUBREC at all");
        acknowledged.extend(this_round);
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
        for key in &acknowledged {
            match count.get(key) {
                Some(1) => {}
                Some(n) => panic!("round {round}: {key} stored {n} times"),
                None => panic!("round {round}: acknowledged {key} missing after kill -9"),
            }
        }
        d = Daemon::start_with(&d.config_path.clone(), d.data_dir.clone());
    }
    let addr = mqtt_addr(&mut d);
    drain(addr, false, &mut received);
    for key in &acknowledged {
        assert!(
            received.contains(key),
            "{key} acknowledged but never delivered"
        );
    }
    eprintln!(
        "{} QoS 2 publishes acknowledged, all stored once and delivered to the persistent subscriber",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > 500,
        "too little load: {}",
        acknowledged.len()
    );
    d.terminate(Duration::from_secs(15));
}

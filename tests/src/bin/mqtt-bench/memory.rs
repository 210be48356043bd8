//! Resident memory: idle devices (`--idle`), and messages queued for offline sessions
//! (`--queued`). The clients are the raw 3.1.1 wire client (`outpost_e2e::mqtt_wire`): nothing
//! here is about client speed.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use outpost_e2e::mqtt_wire::{Connect, Next, Wire, publish, subscribe};

use crate::{Options, Server, median, rss_kib};

/// Lets a client publish to every device's topics (`--queued` fills other sessions' queues).
const PUBLISH_ANYWHERE: &str = "[mqtt.acl]\npublish = [\"devices/#\"]\n";

/// The commands filter of idle device `id` (inside its default ACL).
fn commands(id: &str) -> String {
    format!("devices/anonymous/{id}/commands/#")
}

/// Connects `id` (3.1.1, keep-alive 600 s) and, with `subscribe`, subscribes it to its commands
/// at QoS 1. Fails unless CONNACK and SUBACK say yes.
fn device(addr: std::net::SocketAddr, id: &str, clean: bool, subscribe_too: bool) -> Wire {
    let (mut w, connack) = Wire::connect(addr, &Connect::v311(id).clean(clean).keep_alive(600));
    assert_eq!(connack.connack().1, 0, "CONNACK of {id}: {connack:?}");
    if subscribe_too {
        w.send(&subscribe(1, None, &[(&commands(id), 1)]));
        let suback = w.expect().unwrap();
        assert_eq!(suback.codes(false), [1], "SUBACK of {id}: {suback:?}");
    }
    w
}

/// RSS with `--idle` devices connected and doing nothing: plain, each subscribed to its
/// commands (`--idle-subscribe`), or each with a persistent session and that subscription
/// (`--idle-persistent`).
pub fn idle(o: &Options) -> anyhow::Result<()> {
    let what = if o.idle_persistent {
        "with a persistent session and one subscription each"
    } else if o.idle_subscribe {
        "each subscribed to its commands"
    } else {
        "publish-only (no subscription, clean session)"
    };
    println!("mqtt-bench: RSS with {} idle devices, {what}", o.idle);
    for kind in &o.brokers {
        let mut figures = Vec::new();
        for run in 1..=o.runs {
            let (server, addr) = Server::start(kind, o.idle + 16, "")?;
            let before = rss_kib(server.pid())?;
            let held: Vec<Wire> = (0..o.idle)
                .map(|i| {
                    device(
                        addr,
                        &format!("idle-{i}"),
                        !o.idle_persistent,
                        o.idle_subscribe || o.idle_persistent,
                    )
                })
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            let rss = rss_kib(server.pid())?;
            let sessions = server.daemon().map(|d| {
                (
                    d.metric("outpost_mqtt_connections"),
                    d.metric("outpost_mqtt_persistent_sessions"),
                )
            });
            println!(
                "{kind} run {run}: {} idle devices: RSS {:.1} MiB (before they connected: {:.1} \
                 MiB){}",
                held.len(),
                rss as f64 / 1024.0,
                before as f64 / 1024.0,
                sessions.map_or(String::new(), |(c, p)| format!(
                    "; outpost_mqtt_connections {c}, outpost_mqtt_persistent_sessions {p}"
                ))
            );
            figures.push(rss as f64 / 1024.0);
            drop(held);
            server.stop()?;
        }
        println!(
            "{kind}: median RSS with {} idle devices ({what}): {:.1} MiB",
            o.idle,
            median(figures)
        );
    }
    Ok(())
}

/// RSS growth while `--queued` 100-byte QoS 1 messages wait for `--sessions` offline persistent
/// sessions (spread evenly), measured from after the sessions went offline to 3 s after the last
/// PUBACK.
pub fn queued(o: &Options) -> anyhow::Result<()> {
    println!(
        "mqtt-bench: RSS growth with {} queued {}-byte QoS 1 messages for {} offline sessions",
        o.queued, o.payload, o.sessions
    );
    for kind in &o.brokers {
        let mut growth = Vec::new();
        for run in 1..=o.runs {
            let (server, addr) = Server::start(kind, o.sessions + 16, PUBLISH_ANYWHERE)?;
            let ids: Vec<String> = (0..o.sessions).map(|i| format!("sleeper-{i}")).collect();
            for id in &ids {
                let mut w = device(addr, id, false, true);
                w.send(&[0xE0, 0x00]);
                ensure!(
                    matches!(w.next(Duration::from_secs(5)), Next::Closed),
                    "{id} did not close after DISCONNECT"
                );
            }
            std::thread::sleep(Duration::from_secs(2));
            let before = rss_kib(server.pid())?;
            publish_to(addr, &ids, o.queued, o.payload)?;
            std::thread::sleep(Duration::from_secs(3));
            let after = rss_kib(server.pid())?;
            // The metric exists since persistent sessions live on disk (not in `before`).
            let queued = server
                .daemon()
                .filter(|_| *kind == "outpost")
                .map(|d| d.metric("outpost_mqtt_queued"));
            if let Some(q) = queued
                && q as usize != o.queued
            {
                bail!("outpost_mqtt_queued is {q}, not {}", o.queued);
            }
            let delta = (after as f64 - before as f64) / 1024.0;
            println!(
                "{kind} run {run}: RSS {:.1} MiB before, {:.1} MiB with the messages queued: \
                 {delta:+.1} MiB{}",
                before as f64 / 1024.0,
                after as f64 / 1024.0,
                queued.map_or(String::new(), |q| format!("; outpost_mqtt_queued {q}"))
            );
            growth.push(delta);
            server.stop()?;
        }
        println!(
            "{kind}: median RSS growth with {} queued messages: {:+.1} MiB",
            o.queued,
            median(growth)
        );
    }
    Ok(())
}

/// Publishes `count` QoS 1 messages round-robin to the sessions' commands topics, 50 in flight,
/// and waits for every PUBACK.
fn publish_to(
    addr: std::net::SocketAddr,
    ids: &[String],
    count: usize,
    payload: usize,
) -> anyhow::Result<()> {
    let (mut w, connack) = Wire::connect(addr, &Connect::v311("queue-filler"));
    ensure!(connack.connack().1 == 0, "CONNACK {connack:?}");
    let body = vec![b'x'; payload];
    let topics: Vec<String> = ids
        .iter()
        .map(|id| format!("devices/anonymous/{id}/commands/run"))
        .collect();
    let mut sent = 0;
    while sent < count {
        let batch = (count - sent).min(50);
        let mut bytes = Vec::new();
        for k in 0..batch {
            let n = sent + k;
            let pkid = u16::try_from(n % 60_000 + 1)?;
            bytes.extend(publish(
                1,
                false,
                false,
                &topics[n % topics.len()],
                pkid,
                None,
                &body,
            ));
        }
        w.send(&bytes);
        for _ in 0..batch {
            let p = w.expect().map_err(anyhow::Error::msg).context("PUBACK")?;
            ensure!(p.kind() == 4, "expected PUBACK, got {p:?}");
        }
        sent += batch;
    }
    w.send(&[0xE0, 0x00]);
    Ok(())
}

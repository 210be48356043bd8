//! Publish load: N publishers at QoS 1 (as fast as PUBACKs allow, or at a fixed total rate),
//! optionally one QoS 0 subscriber to every publisher's topic (`--watch`), over MQTT 3.1.1 or
//! MQTT 5 with properties. Runs alternate between the setups (broker × protocol), so a slow
//! phase of the machine hits all of them.
//!
//! Latency is publish call → PUBACK: it includes the client's own queueing, so at a fixed rate it
//! is what a device would see. A PUBACK counts when its publish was made inside the window.
//!
//! The load client shares the machine's cores with the broker, so at full speed a figure is
//! partly the client's: the bench also reports the broker's own CPU time per PUBACKed message
//! in the window (all its threads, from `/proc/<pid>/stat`), which is what compares protocols
//! or builds without the client's cost in it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

use crate::{Options, Protocol, Server, median, quantile_ms};
use outpost_e2e::daemon::cpu_seconds;

/// The topic filter of the `--watch` subscriber, and what it lets Outpost's ACL allow.
const WATCH_FILTER: &str = "devices/anonymous/+/t";
const WATCH_ACL: &str = "[mqtt.acl]\nsubscribe = [\"devices/#\"]\n";

/// What a client's event loop reported, in the terms the bench needs.
enum Seen {
    /// A PUBLISH with this packet id went out.
    Sent(u16),
    /// Its PUBACK came back (false: with a failure reason code).
    Acked(u16, bool),
    /// A message arrived, with this many properties (content type + user properties).
    Message(usize),
    /// The SUBACK came back (false: refused).
    SubAck(bool),
    Other,
}

/// rumqttc's two event loops behind one interface.
trait Events {
    async fn next(&mut self) -> Result<Seen, String>;
}

impl Events for rumqttc::EventLoop {
    async fn next(&mut self) -> Result<Seen, String> {
        use rumqttc::{Event, Outgoing, Packet};
        Ok(match self.poll().await.map_err(|e| e.to_string())? {
            Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Sent(pkid),
            Event::Incoming(Packet::PubAck(ack)) => Seen::Acked(ack.pkid, true),
            Event::Incoming(Packet::Publish(_)) => Seen::Message(0),
            Event::Incoming(Packet::SubAck(ack)) => Seen::SubAck(
                ack.return_codes
                    .iter()
                    .all(|c| !matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)),
            ),
            _ => Seen::Other,
        })
    }
}

impl Events for rumqttc::v5::EventLoop {
    async fn next(&mut self) -> Result<Seen, String> {
        use rumqttc::Outgoing;
        use rumqttc::v5::Event;
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
        Ok(match self.poll().await.map_err(|e| e.to_string())? {
            Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Sent(pkid),
            Event::Incoming(Packet::PubAck(ack)) => Seen::Acked(
                ack.pkid,
                matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ),
            ),
            Event::Incoming(Packet::Publish(p)) => Seen::Message(p.properties.map_or(0, |p| {
                usize::from(p.content_type.is_some()) + p.user_properties.len()
            })),
            Event::Incoming(Packet::SubAck(ack)) => Seen::SubAck(
                ack.return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            ),
            _ => Seen::Other,
        })
    }
}

/// One run's figures for one setup.
struct Figures {
    rate: f64,
    p99: f64,
    /// Messages per second the `--watch` subscriber received.
    delivered: Option<f64>,
    /// The broker's CPU time per PUBACKed message in the window, microseconds.
    cpu_us: f64,
}

pub fn run(o: &Options, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let mode = if o.rate == 0 {
        "as fast as PUBACKs allow".to_owned()
    } else {
        format!("{} msg/s in total", o.rate)
    };
    println!(
        "mqtt-bench: {} publishers, QoS 1, {}-byte payloads, {mode}, in-flight {} per publisher, \
         {} s measured after {} s warm-up, {} run(s){}",
        o.publishers,
        o.payload,
        o.inflight,
        o.seconds,
        o.warmup,
        o.runs,
        if o.watch {
            ", one QoS 0 subscriber to every topic"
        } else {
            ""
        }
    );
    let setups: Vec<(&str, Protocol)> = o
        .brokers
        .iter()
        .flat_map(|&kind| o.protocols.iter().map(move |&p| (kind, p)))
        .collect();
    let mut figures: Vec<Vec<Figures>> = setups.iter().map(|_| Vec::new()).collect();
    for run in 1..=o.runs {
        for ((kind, protocol), f) in setups.iter().zip(&mut figures) {
            f.push(one_run(o, runtime, kind, *protocol, run)?);
        }
    }
    let mut medians = Vec::new();
    for ((kind, protocol), figures) in setups.iter().zip(figures) {
        let rate = median(figures.iter().map(|f| f.rate).collect());
        let p99 = median(figures.iter().map(|f| f.p99).collect());
        let delivered = median(figures.iter().filter_map(|f| f.delivered).collect());
        let cpu_us = median(figures.iter().map(|f| f.cpu_us).collect());
        print!(
            "{kind} MQTT {}: median of {} runs: {rate:.0} msg/s PUBACKed, p99 publish->PUBACK \
             {p99:.2} ms, broker CPU {cpu_us:.2} us per message",
            protocol.name(),
            o.runs
        );
        if o.watch {
            print!(", {delivered:.0} msg/s delivered to the subscriber");
        }
        println!();
        medians.push((*kind, *protocol, rate, p99, delivered, cpu_us));
    }
    for &(kind, protocol, rate, p99, delivered, _) in &medians {
        if kind == "mosquitto" {
            continue;
        }
        if let Some(&(.., m_rate, m_p99, m_delivered, _)) = medians
            .iter()
            .find(|m| m.0 == "mosquitto" && m.1 == protocol)
        {
            println!(
                "ratio {kind}/mosquitto, MQTT {}: throughput {:.2}, p99 latency {:.2}{}",
                protocol.name(),
                rate / m_rate,
                p99 / m_p99,
                if o.watch {
                    format!(", delivered {:.2}", delivered / m_delivered)
                } else {
                    String::new()
                }
            );
        }
    }
    for &(kind, protocol, rate, _, delivered, cpu_us) in &medians {
        if protocol != Protocol::V5 {
            continue;
        }
        if let Some(&(.., v3_rate, _, v3_delivered, v3_cpu_us)) =
            medians.iter().find(|m| m.0 == kind && m.1 == Protocol::V3)
        {
            // The CPU ratio is the throughput ratio the broker alone would allow.
            println!(
                "ratio MQTT 5 + properties / 3.1.1, {kind}: PUBACKed {:.2}{}, messages per \
                 broker CPU second {:.2}",
                rate / v3_rate,
                if o.watch {
                    format!(", delivered {:.2}", delivered / v3_delivered)
                } else {
                    String::new()
                },
                v3_cpu_us / cpu_us
            );
        }
    }
    Ok(())
}

fn one_run(
    o: &Options,
    runtime: &tokio::runtime::Runtime,
    kind: &str,
    protocol: Protocol,
    run: usize,
) -> anyhow::Result<Figures> {
    let acl = if o.watch { WATCH_ACL } else { "" };
    let (server, addr) = Server::start(kind, o.publishers + 16, acl)?;
    let pid = server.pid();
    if let Some(cpus) = &o.broker_cpus {
        crate::pin(pid, cpus)?;
    }
    let measure = Duration::from_secs(o.seconds);
    let warmup = Duration::from_secs(o.warmup);
    let payload = if o.json {
        let head = r#"{"temperature":21.5,"humidity":48.2,"pad":""#;
        let pad = o.payload.saturating_sub(head.len() + 2);
        Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
    } else {
        Bytes::from(vec![b'x'; o.payload])
    };
    let (tallies, watched, cpu_seconds) = runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(500);
        let window = (start + warmup, start + warmup + measure);
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(window.0.into()).await;
            let before = cpu_seconds(pid)?;
            tokio::time::sleep_until(window.1.into()).await;
            anyhow::Ok(cpu_seconds(pid)? - before)
        });
        let watcher = if o.watch {
            let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(watcher(addr, protocol, window, subscribed_tx));
            subscribed.await.context("the watcher's SUBACK")?;
            Some(task)
        } else {
            None
        };
        let mut tasks = Vec::new();
        for i in 0..o.publishers {
            // Spread the publishers' ticks over one period.
            let period =
                (o.rate > 0).then(|| Duration::from_secs_f64(o.publishers as f64 / o.rate as f64));
            let offset = period.map_or(Duration::ZERO, |p| {
                p.mul_f64(i as f64 / o.publishers as f64)
            });
            let pace = Pace {
                period,
                start: start + offset,
                window,
            };
            tasks.push(tokio::spawn(publisher(
                i,
                addr,
                protocol,
                o.inflight,
                payload.clone(),
                pace,
            )));
        }
        let mut tallies = Vec::new();
        for t in tasks {
            tallies.push(t.await?);
        }
        let watched = match watcher {
            Some(w) => Some(w.await??),
            None => None,
        };
        let cpu_seconds = cpu.await??;
        anyhow::Ok((tallies, watched, cpu_seconds))
    })?;
    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    let acked = latencies.len();
    let rate = acked as f64 / measure.as_secs_f64();
    let cpu_us = cpu_seconds * 1e6 / acked.max(1) as f64;
    let (p50, p99, max) = (
        quantile_ms(&latencies, 0.50),
        quantile_ms(&latencies, 0.99),
        quantile_ms(&latencies, 1.0),
    );
    let stored = server.stop()?;
    println!(
        "{kind} MQTT {} run {run}: {acked} PUBACKs in {:.0} s = {rate:.0} msg/s; publish->PUBACK \
         p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; broker CPU {cpu_seconds:.2} s = \
         {cpu_us:.2} us per message; {} errors{}",
        protocol.name(),
        measure.as_secs_f64(),
        errors.len(),
        stored.map_or(String::new(), |n| format!(
            "; {n} records in the outbox (warm-up included)"
        )),
    );
    if let Some(first) = errors.first() {
        println!("  first error: {first}");
    }
    let delivered = watched.map(|(n, fewest_props)| {
        let per_second = n as f64 / measure.as_secs_f64();
        println!(
            "  subscriber: {n} messages received in the window = {per_second:.0} msg/s; fewest \
             properties on one: {}",
            fewest_props.map_or("-".to_owned(), |p| p.to_string())
        );
        per_second
    });
    Ok(Figures {
        rate,
        p99,
        delivered,
        cpu_us,
    })
}

/// The `--watch` subscriber: QoS 0 on every publisher's topic; counts the messages that arrive
/// inside the window and the fewest properties one carried. Tells `subscribed` once the SUBACK
/// is in.
async fn watcher(
    addr: SocketAddr,
    protocol: Protocol,
    (from, until): (Instant, Instant),
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<(u64, Option<usize>)> {
    let host = addr.ip().to_string();
    match protocol {
        Protocol::V3 => {
            let mut options = rumqttc::MqttOptions::new("bench-watch", host, addr.port());
            options.set_keep_alive(Duration::from_secs(60));
            let (client, events) = rumqttc::AsyncClient::new(options, 10);
            client
                .subscribe(WATCH_FILTER, rumqttc::QoS::AtMostOnce)
                .await?;
            count_messages(events, (from, until), subscribed).await
        }
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new("bench-watch", host, addr.port());
            options.set_keep_alive(Duration::from_secs(60));
            let (client, events) = rumqttc::v5::AsyncClient::new(options, 10);
            client
                .subscribe(WATCH_FILTER, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
                .await?;
            count_messages(events, (from, until), subscribed).await
        }
    }
}

async fn count_messages(
    mut events: impl Events,
    (from, until): (Instant, Instant),
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<(u64, Option<usize>)> {
    let mut subscribed = Some(subscribed);
    let mut received = 0u64;
    let mut fewest_props: Option<usize> = None;
    loop {
        let seen = match tokio::time::timeout_at(until.into(), events.next()).await {
            Err(_) => return Ok((received, fewest_props)),
            Ok(seen) => seen.map_err(anyhow::Error::msg).context("watcher")?,
        };
        match seen {
            Seen::SubAck(false) => bail!("the watcher's subscription was refused"),
            Seen::SubAck(true) => {
                if let Some(s) = subscribed.take() {
                    let _ = s.send(());
                }
            }
            Seen::Message(props) if Instant::now() >= from => {
                received += 1;
                fewest_props = Some(fewest_props.map_or(props, |f| f.min(props)));
            }
            _ => {}
        }
    }
}

/// When a publisher publishes: every `period` (or back to back) from `start`; PUBACKs of
/// publishes made inside `window` count.
#[derive(Clone, Copy)]
struct Pace {
    period: Option<Duration>,
    start: Instant,
    window: (Instant, Instant),
}

/// What one publisher saw in the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: Vec<String>,
}

/// One publisher: QoS 1 publishes until the end of the window. MQTT 5 publishes carry a content
/// type and two user properties.
async fn publisher(
    i: usize,
    addr: SocketAddr,
    protocol: Protocol,
    inflight: u16,
    payload: Bytes,
    pace: Pace,
) -> Tally {
    let id = format!("bench-{i}");
    let topic = format!("devices/anonymous/{id}/t");
    let host = addr.ip().to_string();
    // Publish call times, in call order: rumqttc sends them in that order.
    let called: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    match protocol {
        Protocol::V3 => {
            let mut options = rumqttc::MqttOptions::new(&id, host, addr.port());
            options
                .set_keep_alive(Duration::from_secs(60))
                .set_inflight(inflight);
            let (client, events) = rumqttc::AsyncClient::new(options, usize::from(inflight));
            let producer = produce(pace, Arc::clone(&called), move || {
                let (client, topic, payload) = (client.clone(), topic.clone(), payload.clone());
                async move {
                    client
                        .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await
                        .is_ok()
                }
            });
            track(i, events, called, producer, pace.window).await
        }
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(&id, host, addr.port());
            options
                .set_keep_alive(Duration::from_secs(60))
                .set_outgoing_inflight_upper_limit(inflight);
            let (client, events) = rumqttc::v5::AsyncClient::new(options, usize::from(inflight));
            let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                content_type: Some("application/json".to_owned()),
                user_properties: vec![
                    ("site".to_owned(), "bench".to_owned()),
                    ("unit".to_owned(), "celsius".to_owned()),
                ],
                ..Default::default()
            };
            let producer = produce(pace, Arc::clone(&called), move || {
                let (client, topic, payload, properties) = (
                    client.clone(),
                    topic.clone(),
                    payload.clone(),
                    properties.clone(),
                );
                async move {
                    client
                        .publish_bytes_with_properties(
                            topic,
                            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                            false,
                            payload,
                            properties,
                        )
                        .await
                        .is_ok()
                }
            });
            track(i, events, called, producer, pace.window).await
        }
    }
}

/// Calls `publish` on the pace until the window ends (or it fails), noting each call's time.
fn produce<F, Fut>(
    pace: Pace,
    called: Arc<Mutex<VecDeque<Instant>>>,
    mut publish: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        tokio::time::sleep_until(pace.start.into()).await;
        let mut ticks = pace.period.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        loop {
            if let Some(t) = &mut ticks {
                t.tick().await;
            }
            let now = Instant::now();
            if now >= pace.window.1 {
                return;
            }
            called.lock().unwrap().push_back(now);
            if !publish().await {
                return;
            }
        }
    })
}

/// Drives a publisher's event loop: matches each PUBACK to its publish call's time.
async fn track(
    i: usize,
    mut events: impl Events,
    called: Arc<Mutex<VecDeque<Instant>>>,
    producer: tokio::task::JoinHandle<()>,
    (from, until): (Instant, Instant),
) -> Tally {
    let mut sent: Vec<Option<Instant>> = vec![None; usize::from(u16::MAX) + 1];
    let mut outstanding = 0usize;
    let mut tally = Tally::default();
    let drain_until = until + Duration::from_secs(5);
    loop {
        let seen = match tokio::time::timeout_at(drain_until.into(), events.next()).await {
            Err(_) => break,
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => {
                tally.errors.push(format!("publisher {i}: {e}"));
                break;
            }
        };
        match seen {
            Seen::Sent(pkid) => {
                sent[usize::from(pkid)] = called.lock().unwrap().pop_front();
                outstanding += 1;
            }
            Seen::Acked(pkid, ok) => {
                let t = sent[usize::from(pkid)].take();
                outstanding -= usize::from(t.is_some());
                if !ok {
                    tally
                        .errors
                        .push(format!("publisher {i}: PUBACK {pkid} refused"));
                } else if let Some(t) = t
                    && t >= from
                    && t < until
                {
                    let us = t.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            _ => {}
        }
        if outstanding == 0 && producer.is_finished() {
            break;
        }
    }
    producer.abort();
    tally
}

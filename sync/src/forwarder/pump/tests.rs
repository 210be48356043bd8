//! Every transition of the pump, driven against a fake sink that acks, fails, hangs or refuses
//! each record as the test says, over a real outbox in a temporary directory. Durations are
//! scaled down (`offline_after` 300 ms, backoffs of 50-200 ms) so each test takes about a
//! second; the assertions wait for conditions, never for fixed times.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_config::KafkaConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::super::sink::{Outgoing, Probe, Refused, Reports, Sink};
use super::super::{Forwarder, ForwarderError, ForwarderHandle, ForwarderOptions, NoTags, State};
use super::{Deleter, MakeSink, Pump};
use crate::outbox::{self, AckError, Outbox, OutboxOptions};
use crate::{Envelope, Source};

/// What the fake sink does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Kafka has it: the delivery report succeeds at once.
    Ack,
    /// The delivery report fails with this code.
    Fail(RDKafkaErrorCode),
    /// No report until the test releases it (an unreachable broker).
    Hang,
    /// Refused before it is queued.
    Refuse(RDKafkaErrorCode),
}

/// A record as the sink saw it.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    seq: u64,
    device: String,
    headers: HashMap<String, String>,
}

type Rule = Box<dyn FnMut(&Seen, usize) -> Answer + Send>;

struct Inner {
    /// Decides each record's answer from the record and how often it was offered before.
    rule: Rule,
    /// Every record offered, in order.
    offered: Vec<Seen>,
    /// What Kafka has, in the order it got it.
    kafka: Vec<Seen>,
    /// Records without a report yet, with their tokens.
    held: Vec<(Seen, usize)>,
    /// Records held at most; beyond it `send` answers QueueFull.
    queue_cap: usize,
    fatal: bool,
    purges: usize,
    probe_ok: bool,
}

struct FakeSink {
    inner: Mutex<Inner>,
    reports: Arc<Reports>,
}

impl FakeSink {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            reports: Arc::default(),
            inner: Mutex::new(Inner {
                rule: Box::new(|_, _| Answer::Ack),
                offered: Vec::new(),
                kafka: Vec::new(),
                held: Vec::new(),
                queue_cap: usize::MAX,
                fatal: false,
                purges: 0,
                probe_ok: true,
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn answer(&self, rule: impl FnMut(&Seen, usize) -> Answer + Send + 'static) {
        self.inner().rule = Box::new(rule);
    }

    /// Sequences offered, in order.
    fn offered(&self) -> Vec<u64> {
        self.inner().offered.iter().map(|s| s.seq).collect()
    }

    /// Sequences Kafka has, in order.
    fn in_kafka(&self) -> Vec<u64> {
        self.inner().kafka.iter().map(|s| s.seq).collect()
    }

    fn held(&self) -> usize {
        self.inner().held.len()
    }

    /// Answers the held records whose sequence `which` selects: Kafka gets them.
    fn release(&self, which: impl Fn(u64) -> bool) {
        let mut inner = self.inner();
        let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.held)
            .into_iter()
            .partition(|(seen, _)| which(seen.seq));
        inner.held = stay;
        for (seen, token) in go {
            inner.kafka.push(seen);
            self.reports.push(token, Ok(()));
        }
    }
}

impl Sink for FakeSink {
    fn send<'a>(&self, record: Outgoing<'a>, token: usize) -> Result<(), Refused<'a>> {
        let headers: HashMap<String, String> = record
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                (h.key.to_owned(), value)
            })
            .collect();
        let seen = Seen {
            topic: record.topic.to_owned(),
            seq: headers["outpost-seq"].parse().unwrap(),
            device: headers["outpost-device"].clone(),
            headers,
        };
        let mut inner = self.inner();
        if inner.held.len() >= inner.queue_cap {
            return Err(Refused::QueueFull(record));
        }
        let before = inner.offered.iter().filter(|s| s.seq == seen.seq).count();
        let answer = (inner.rule)(&seen, before);
        inner.offered.push(seen.clone());
        match answer {
            Answer::Ack => {
                inner.kafka.push(seen);
                self.reports.push(token, Ok(()));
                Ok(())
            }
            Answer::Fail(code) => {
                self.reports
                    .push(token, Err(KafkaError::MessageProduction(code)));
                Ok(())
            }
            Answer::Hang => {
                inner.held.push((seen, token));
                Ok(())
            }
            Answer::Refuse(code) => Err(Refused::Error(KafkaError::MessageProduction(code))),
        }
    }

    fn reports(&self) -> Arc<Reports> {
        Arc::clone(&self.reports)
    }

    fn is_fatal(&self) -> bool {
        self.inner().fatal
    }

    fn purge(&self) {
        let mut inner = self.inner();
        inner.purges += 1;
        for (_, token) in std::mem::take(&mut inner.held) {
            self.reports.push(
                token,
                Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::PurgeInflight,
                )),
            );
        }
    }
}

impl Probe for FakeSink {
    fn probe(&self, _topic: &str, _timeout: Duration) -> bool {
        self.inner().probe_ok
    }
}

/// A pump over a fresh outbox and a fake sink, running until dropped.
struct Rig {
    _dir: tempfile::TempDir,
    outbox: Outbox,
    handle: ForwarderHandle,
    sink: Arc<FakeSink>,
    /// Sinks made (the first, then one per fatal error).
    sinks_made: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), ForwarderError>>>,
    writer_stop: CancellationToken,
}

fn kafka() -> KafkaConfig {
    KafkaConfig {
        enabled: true,
        offline_after: Duration::from_millis(300),
        reconnect_backoff_min: Duration::from_millis(50),
        reconnect_backoff_max: Duration::from_millis(200),
        ..KafkaConfig::default()
    }
}

impl Rig {
    /// An outbox holding `backlog` (records of these devices, in order) before the pump starts.
    async fn start(kafka: KafkaConfig, sink: Arc<FakeSink>, backlog: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) =
            outbox::open(OutboxOptions::with_path(dir.path().join("outbox.db"))).unwrap();
        let writer_stop = CancellationToken::new();
        tokio::spawn(writer.run(writer_stop.clone()));
        append(&outbox, backlog).await;
        let options = ForwarderOptions {
            kafka,
            gateway_id: "gw-test".into(),
            client_id: "outpost-gw-test".into(),
            drain_timeout: Duration::from_millis(300),
        };
        let (forwarder, handle) = Forwarder::new(options, outbox.clone(), Arc::new(NoTags));
        let sinks_made = Arc::new(AtomicUsize::new(0));
        let make_sink: MakeSink = {
            let (sink, made) = (Arc::clone(&sink), Arc::clone(&sinks_made));
            Box::new(move || {
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // A new producer: whatever was fatal about the old one is gone.
                sink.inner().fatal = false;
                Ok(Arc::clone(&sink) as Arc<dyn Sink>)
            })
        };
        let stop = CancellationToken::new();
        let mut pump = Pump::new(forwarder, make_sink).unwrap();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { pump.run(stop).await }
        });
        // Records appended from here on are live, not a backlog.
        until("the first plan", || {
            handle.status().state != State::Starting
        })
        .await;
        Self {
            _dir: dir,
            outbox,
            handle,
            sink,
            sinks_made,
            stop,
            task: Some(task),
            writer_stop,
        }
    }

    fn state(&self) -> State {
        self.handle.status().state
    }

    /// Records still in the outbox.
    fn held(&self) -> u64 {
        self.outbox.figures().0
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the pump stops")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
        self.writer_stop.cancel();
    }
}

/// Appends one record per entry, for that device, in order.
async fn append(outbox: &Outbox, devices: &[&str]) {
    let envelopes = devices
        .iter()
        .map(|device| Envelope {
            route: Arc::from("default"),
            device_id: (*device).to_owned(),
            source: Source::Mqtt,
            topic: format!("t/{device}"),
            received_at_ms: outbox::now_unix_ms(),
            content_type: None,
            headers: Vec::new(),
            payload: b"21.5".to_vec().into(),
            priority: None,
        })
        .collect();
    outbox.append_all(envelopes).await.unwrap();
}

/// Waits up to 5 s for `cond`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn sorted(mut seqs: Vec<u64>) -> Vec<u64> {
    seqs.sort_unstable();
    seqs
}

/// Starting → Live: with nothing waiting the plan says Live; records are produced as they are
/// committed, in order, and deleted once Kafka has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_backlog_the_pump_is_live_and_deletes_what_kafka_has() {
    let rig = Rig::start(kafka(), FakeSink::new(), &[]).await;
    until("live", || rig.state() == State::Live).await;
    append(&rig.outbox, &["a", "a", "b", "a", "b"]).await;
    until("all in Kafka and deleted", || {
        rig.sink.in_kafka().len() == 5 && rig.held() == 0
    })
    .await;
    assert_eq!(rig.sink.in_kafka(), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        rig.sink.offered(),
        vec![1, 2, 3, 4, 5],
        "each produced once"
    );
    let status = rig.handle.status();
    assert_eq!(
        (status.state, status.delivered, status.failed),
        (State::Live, 5, 0)
    );
}

/// Starting → Backfill → Live: a backlog drains at `backlog_rate` while live records of devices
/// without a backlog go first; a device with a backlog gets its live records after it, so every
/// device's records reach Kafka in receive order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_backfill_until_drained_and_each_device_keeps_its_order() {
    let config = KafkaConfig {
        backlog_rate: 100,
        ..kafka()
    };
    let backlog: Vec<&str> = (0..40)
        .map(|i| if i % 2 == 0 { "a" } else { "b" })
        .collect();
    let rig = Rig::start(config, FakeSink::new(), &backlog).await;
    until("backfill", || rig.state() == State::Backfill).await;
    // Live records: device c has no backlog, device a has one.
    append(&rig.outbox, &["c", "a", "c"]).await;
    until("c's live records in Kafka", || {
        let kafka = rig.sink.in_kafka();
        kafka.contains(&41) && kafka.contains(&43)
    })
    .await;
    assert!(
        rig.sink.in_kafka().len() < 40,
        "c's live records went before the backlog was drained"
    );
    assert_eq!(rig.state(), State::Backfill);
    until("drained and live", || {
        rig.state() == State::Live && rig.sink.in_kafka().len() == 43
    })
    .await;
    let mut last: HashMap<String, u64> = HashMap::new();
    for seen in rig.sink.inner().kafka.iter() {
        let before = last.insert(seen.device.clone(), seen.seq).unwrap_or(0);
        assert!(
            before < seen.seq,
            "{} out of order: {} after {before}",
            seen.device,
            seen.seq
        );
    }
    assert_eq!(sorted(rig.sink.in_kafka()), (1..=43).collect::<Vec<_>>());
    until("deleted", || rig.held() == 0).await;
}

/// Live → Offline → Rewinding → Live: records that get no acknowledgement for `offline_after`,
/// from a broker that does not answer the probe either, make the pump Offline; it keeps filling
/// the window meanwhile; the first acknowledgement ends the outage once (last error cleared)
/// and the pump plans again. Nothing is produced twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_offline_and_the_first_acknowledgement_plans_again() {
    let sink = FakeSink::new();
    sink.answer(|_, _| Answer::Hang);
    sink.inner().probe_ok = false;
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a"]).await;
    until("offline", || rig.state() == State::Offline).await;
    assert!(rig.handle.status().offline_since_ms.is_some());
    append(&rig.outbox, &["a", "a"]).await;
    until("still filling the window while offline", || {
        sink.held() == 5
    })
    .await;
    sink.answer(|_, _| Answer::Ack);
    sink.release(|_| true);
    until("live again, all deleted", || {
        rig.state() == State::Live && rig.held() == 0
    })
    .await;
    assert_eq!(
        sink.offered(),
        vec![1, 2, 3, 4, 5],
        "nothing produced twice"
    );
    let status = rig.handle.status();
    assert_eq!(status.last_error, None);
    assert_eq!(status.offline_since_ms, None);
}

/// Records held without an acknowledgement while the brokers answer the probe (a partition
/// without a leader) are not an outage: the pump stays Live past `offline_after` and the other
/// records keep going. Before, it went Offline, and the next acknowledgement started a rewind
/// that waited for the stuck records, so nothing else was produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stuck_while_the_brokers_answer_are_not_an_outage() {
    let sink = FakeSink::new();
    sink.answer(|seen, _| {
        if seen.device == "stuck" {
            Answer::Hang
        } else {
            Answer::Ack
        }
    });
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["stuck", "stuck"]).await;
    until("the stuck records in flight", || sink.held() == 2).await;
    // A condition cannot say "stayed Live for a while": let three `offline_after`s pass.
    tokio::time::sleep(kafka().offline_after * 3).await;
    assert_eq!(rig.state(), State::Live, "the brokers answer: not offline");
    for _ in 0..3 {
        append(&rig.outbox, &["a", "a"]).await;
    }
    until("the others delivered and deleted", || rig.held() == 2).await;
    assert_eq!(rig.state(), State::Live);
    assert_eq!(sink.in_kafka(), (3..=8).collect::<Vec<_>>());
    sink.release(|_| true);
    until("the stuck ones too", || rig.held() == 0).await;
    assert_eq!(sink.offered(), (1..=8).collect::<Vec<_>>(), "nothing twice");
}

/// Live → Offline → Live while idle: with nothing in flight the probe decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pump_is_offline_while_probes_fail_and_live_once_one_answers() {
    let sink = FakeSink::new();
    sink.inner().probe_ok = false;
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    until("offline", || rig.state() == State::Offline).await;
    sink.inner().probe_ok = true;
    until("live", || rig.state() == State::Live).await;
    assert!(sink.offered().is_empty());
}

/// Live → Rewinding → Live: a failed delivery (an outage class error) stops producing until
/// in-flight records settled and the backoff passed; the plan then sends exactly what the
/// outbox still holds. The state shown stays Live meanwhile (Kafka answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_rewinds_and_sends_again_what_the_outbox_holds() {
    let sink = FakeSink::new();
    sink.answer(|seen, before| match (seen.seq, before) {
        (3, 0) => Answer::Fail(RDKafkaErrorCode::BrokerTransportFailure),
        _ => Answer::Ack,
    });
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a", "a", "a"]).await;
    // The plan after the rewind finds record 3 below the live cursor: a backlog of one, so
    // Backfill until its cursor finds nothing more, then Live.
    until("all in Kafka, deleted, live", || {
        sink.in_kafka().len() == 5 && rig.held() == 0 && rig.state() == State::Live
    })
    .await;
    assert_eq!(
        sink.offered(),
        vec![1, 2, 3, 4, 5, 3],
        "only the failed one again"
    );
    assert_eq!(sorted(sink.in_kafka()), vec![1, 2, 3, 4, 5]);
    let status = rig.handle.status();
    assert_eq!(
        (status.state, status.failed, status.poison),
        (State::Live, 1, 0)
    );
}

/// Rewinding's backoff: an error not known to be permanent is tried again, each time after a
/// rewind, and after `dead_letter.max_attempts` the record is poison (moved to the local
/// dead-letter table) while the others went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_failing_is_poison_after_max_attempts() {
    let sink = FakeSink::new();
    sink.answer(|seen, _| match seen.seq {
        2 => Answer::Fail(RDKafkaErrorCode::InvalidRequiredAcks),
        _ => Answer::Ack,
    });
    let mut config = kafka();
    config.dead_letter.max_attempts = 3;
    let rig = Rig::start(config, Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a"]).await;
    until("moved aside", || rig.handle.status().poison == 1).await;
    assert_eq!(
        sink.offered().iter().filter(|s| **s == 2).count(),
        3,
        "offered max_attempts times"
    );
    until("the others deleted", || rig.held() == 0).await;
    assert_eq!(sorted(sink.in_kafka()), vec![1, 3]);
    assert_eq!(rig.outbox.dead_letter_figures().0, 1);
}

/// Poison without a rewind: a record refused outright goes to the local dead-letter table and
/// nothing else is sent again; put back (`dead-letters retry`), the pump plans again and sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_is_moved_aside_and_sent_again_when_put_back() {
    let sink = FakeSink::new();
    sink.answer(|seen, _| match seen.seq {
        2 => Answer::Refuse(RDKafkaErrorCode::MessageSizeTooLarge),
        _ => Answer::Ack,
    });
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a", "a"]).await;
    until("others deleted, one dead letter", || {
        rig.held() == 0 && rig.outbox.dead_letter_figures().0 == 1
    })
    .await;
    assert_eq!(
        sink.offered(),
        vec![1, 2, 3, 4],
        "no rewind: nothing sent twice"
    );
    assert_eq!(sink.in_kafka(), vec![1, 3, 4]);
    let status = rig.handle.status();
    assert_eq!((status.poison, status.state), (1, State::Live));
    sink.answer(|_, _| Answer::Ack);
    rig.outbox.retry_dead_letters(None).await.unwrap();
    until("the put-back record in Kafka", || {
        sink.in_kafka().contains(&2)
    })
    .await;
    until("deleted", || rig.held() == 0).await;
    assert_eq!(rig.outbox.dead_letter_figures().0, 0);
}

/// A delivery Kafka refuses for good goes to the dead-letter topic with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_delivery_goes_to_the_dead_letter_topic_with_its_cause() {
    let sink = FakeSink::new();
    sink.answer(|seen, _| match (seen.seq, seen.topic.as_str()) {
        (2, "outpost.readings") => Answer::Fail(RDKafkaErrorCode::MessageSizeTooLarge),
        _ => Answer::Ack,
    });
    let mut config = kafka();
    config.dead_letter.topic = Some("outpost.dead".into());
    let rig = Rig::start(config, Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a"]).await;
    until("all deleted", || {
        rig.held() == 0 && sink.in_kafka().len() == 3
    })
    .await;
    let inner = sink.inner();
    let dead: Vec<&Seen> = inner
        .kafka
        .iter()
        .filter(|s| s.topic == "outpost.dead")
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, 2);
    assert_eq!(dead[0].headers["outpost-error-reason"], "too_large");
    assert_eq!(dead[0].headers["outpost-error-topic"], "outpost.readings");
    drop(inner);
    assert_eq!(rig.handle.status().poison, 1);
}

/// A fatal error: what the sink holds is purged, a new sink is made, and the records are sent
/// again through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_purges_and_makes_a_new_sink() {
    let sink = FakeSink::new();
    sink.answer(|seen, before| match (seen.seq, before) {
        (1, 0) => Answer::Fail(RDKafkaErrorCode::Fatal),
        _ => Answer::Ack,
    });
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a"]).await;
    until("in Kafka", || sink.in_kafka() == vec![1]).await;
    until("deleted", || rig.held() == 0).await;
    assert_eq!(rig.sinks_made.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(sink.inner().purges, 1);
    assert_eq!(rig.handle.metrics().producer_restarts.get(), 1);
}

/// A full client queue: the pump waits for a delivery and offers the record again; nothing is
/// lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_client_queue_waits_for_a_delivery() {
    let sink = FakeSink::new();
    sink.answer(|_, _| Answer::Hang);
    sink.inner().queue_cap = 2;
    sink.inner().probe_ok = false;
    let rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a", "a", "a"]).await;
    until("two held", || sink.held() == 2).await;
    for _ in 0..3 {
        sink.release(|_| true);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until("all in Kafka", || sink.in_kafka().len() == 5).await;
    assert_eq!(sink.in_kafka(), vec![1, 2, 3, 4, 5]);
    assert_eq!(sink.offered(), vec![1, 2, 3, 4, 5]);
    until("deleted", || rig.held() == 0).await;
}

/// A client queue that stays full (a broker gone while large records fill librdkafka's 16 MiB)
/// does not block the pump: the status turns Offline and shutdown is not held up; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_queue_that_stays_full_blocks_neither_the_status_nor_shutdown() {
    let sink = FakeSink::new();
    sink.answer(|_, _| Answer::Hang);
    sink.inner().queue_cap = 2;
    sink.inner().probe_ok = false;
    let mut rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a", "a", "a"]).await;
    until("two held", || sink.held() == 2).await;
    until("offline", || rig.state() == State::Offline).await;
    let started = Instant::now();
    rig.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(rig.held(), 5, "all five stay in the outbox");
    assert_eq!(sink.offered(), vec![1, 2], "the rest was never queued");
}

/// Draining → Stopped: in-flight records get `drain_timeout`; what was acknowledged is
/// deleted, what was not stays in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keeps_what_kafka_did_not_acknowledge() {
    let sink = FakeSink::new();
    sink.answer(|_, _| Answer::Hang);
    let mut rig = Rig::start(kafka(), Arc::clone(&sink), &[]).await;
    append(&rig.outbox, &["a", "a", "a"]).await;
    until("three held", || sink.held() == 3).await;
    sink.release(|seq| seq == 1);
    let started = Instant::now();
    rig.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "drain_timeout bounds the drain"
    );
    assert_eq!(rig.state(), State::Stopped);
    assert_eq!(rig.held(), 2, "the unacknowledged records stay");
    assert_eq!(rig.handle.status().delivered, 1);
}

/// The deleter: a failed delete puts its records back and holds production until a retry
/// succeeds; a window's worth of delivered records holds it too.
#[tokio::test]
async fn a_failing_delete_holds_production_until_a_retry_works() {
    let signals = super::super::LinkSignals::default();
    let mut deleter = Deleter::new();
    deleter.delivered = vec![1, 2];
    assert!(!deleter.holds(10));
    assert!(deleter.holds(2), "a window's worth waits for its delete");
    deleter.delivered.clear();
    let done = Ok((vec![1, 2], Err(AckError::Storage("disk full".into()))));
    deleter.state = super::Deleting::Running {
        task: tokio::spawn(std::future::pending()),
        retry: false,
    };
    assert!(deleter.finished(done, &signals).is_empty());
    assert!(deleter.holds(10), "failing: nothing is produced");
    assert_eq!(deleter.delivered, vec![1, 2], "put back for the retry");
    assert!(
        deleter
            .due_in()
            .is_some_and(|d| d > Duration::from_millis(100))
    );
    assert!(signals.last_error().is_some());
    deleter.state = super::Deleting::Running {
        task: tokio::spawn(std::future::pending()),
        retry: true,
    };
    assert!(deleter.holds(10), "still held while the retry runs");
    let done = Ok((vec![1, 2], Ok(2)));
    assert_eq!(deleter.finished(done, &signals), vec![1, 2]);
    assert!(!deleter.holds(10));
    assert!(signals.last_error().is_none(), "cleared");
}

//! Where the at-least-once forwarder hands records: a [`Sink`]. In the daemon that is
//! librdkafka's producer ([`KafkaSink`]); the forwarder's unit tests use a fake that acks,
//! fails, hangs or refuses each record as the test says, so every transition of the
//! forwarder's state machine is tested without a broker.
//!
//! The trait is the narrow part of the producer the forwarder uses: queue a record under a
//! token, collect the delivery reports ([`Reports`]), know whether the client is beyond repair,
//! purge what it holds, ask whether a broker answers ([`Probe`]). Errors stay librdkafka's
//! [`KafkaError`], because the forwarder classifies them ([`super::poison::classify`]) the same
//! way whoever produced them.
//!
//! # Why reports arrive in batches
//!
//! A rate-limited backlog drain produces thousands of records a second and is meant to cost a
//! small share of a core (issue #13). A future per record (what rdkafka's `FutureProducer`
//! gives) costs a oneshot channel, a boxed future, a task node in the pump's
//! `FuturesUnordered` and a wake-up of the pump per report. Here librdkafka's polling thread
//! appends `(token, result)` to one shared list and wakes the pump only when the list was
//! empty; the pump takes the whole list at once. A record then costs no allocation of its own
//! on the way back.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, FutureProducer, Producer, PurgeConfig};
use tokio::sync::Notify;

use super::client;
use super::polled::{OnDelivery, PolledProducer};

/// A record for the sink, borrowed from the outbox record it was read as.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub headers: OwnedHeaders,
    pub timestamp_ms: i64,
}

/// The delivery report of one queued record: the token it was sent with, `Ok` once Kafka has
/// it.
pub type Report = (usize, Result<(), KafkaError>);

/// A sink's delivery reports, waiting for the pump: appended one at a time by whoever learns
/// the outcome (librdkafka's polling thread), taken all at once by the pump.
#[derive(Debug, Default)]
pub struct Reports {
    ready: Mutex<Vec<Report>>,
    arrived: Notify,
}

impl Reports {
    /// Adds a report; wakes the pump if it is the first since the last [`Self::take`].
    pub fn push(&self, token: usize, result: Result<(), KafkaError>) {
        let first = {
            let mut ready = self.lock();
            ready.push((token, result));
            ready.len() == 1
        };
        if first {
            // A permit is kept if the pump is not waiting yet: no report goes unnoticed.
            self.arrived.notify_one();
        }
    }

    /// Moves every report that arrived into `into` (empty): the two lists swap, so neither
    /// side allocates once both have grown to a batch.
    pub fn take(&self, into: &mut Vec<Report>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut *self.lock(), into);
    }

    /// Resolves once a report arrived since the last wake-up (possibly one already taken).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Report>> {
        // A panic while pushing leaves a valid list.
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a record was not queued.
pub enum Refused<'a> {
    /// The client's queue is full: the record comes back, to be offered again after a delivery.
    QueueFull(Outgoing<'a>),
    /// Refused outright (too large for the client, an unknown topic name, a fatal client, …):
    /// classified like a failed delivery.
    Error(KafkaError),
}

/// Whether a broker answers: what the idle link check ([`super::probe::IdleProbe`]) asks.
pub trait Probe: Send + Sync {
    /// Whether a broker answers a metadata request for `topic` within `timeout`. Blocking.
    fn probe(&self, topic: &str, timeout: Duration) -> bool;
}

/// The narrow producer interface of the at-least-once forwarder.
pub trait Sink: Probe {
    /// Queues a record; its report arrives in [`Self::reports`] under `token`.
    fn send<'a>(&self, record: Outgoing<'a>, token: usize) -> Result<(), Refused<'a>>;

    /// Where this sink's delivery reports arrive.
    fn reports(&self) -> Arc<Reports>;

    /// The client hit a fatal error: nothing more will be delivered by it.
    fn is_fatal(&self) -> bool;

    /// Fails every record the client holds (their reports arrive as errors).
    fn purge(&self);
}

/// librdkafka's producer as the forwarder's sink. Its polling thread ([`PolledProducer`])
/// serves the delivery callbacks, which land in [`Reports`].
pub struct KafkaSink {
    producer: PolledProducer<Arc<Reports>>,
    reports: Arc<Reports>,
}

impl KafkaSink {
    pub fn new(config: &ClientConfig, context: client::Context) -> Result<Self, KafkaError> {
        let reports = Arc::new(Reports::default());
        let producer = PolledProducer::new(config, context, Arc::clone(&reports))?;
        Ok(Self { producer, reports })
    }
}

impl OnDelivery for Arc<Reports> {
    /// The pump's token for the record.
    type Opaque = usize;

    fn delivered(&self, result: Result<(), KafkaError>, token: usize) {
        self.push(token, result);
    }
}

impl Probe for KafkaSink {
    fn probe(&self, topic: &str, timeout: Duration) -> bool {
        answers(self.producer.producer().client(), topic, timeout)
    }
}

impl Sink for KafkaSink {
    fn send<'a>(&self, record: Outgoing<'a>, token: usize) -> Result<(), Refused<'a>> {
        let Outgoing {
            topic,
            key,
            payload,
            headers,
            timestamp_ms,
        } = record;
        let mut kafka_record = BaseRecord::<str, [u8], usize>::with_opaque_to(topic, token)
            .payload(payload)
            .headers(headers)
            .timestamp(timestamp_ms);
        if let Some(key) = key {
            kafka_record = kafka_record.key(key);
        }
        match self.producer.producer().send(kafka_record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                Err(Refused::QueueFull(Outgoing {
                    topic,
                    key,
                    payload,
                    headers: returned.headers.unwrap_or_default(),
                    timestamp_ms,
                }))
            }
            Err((error, _)) => Err(Refused::Error(error)),
        }
    }

    fn reports(&self) -> Arc<Reports> {
        Arc::clone(&self.reports)
    }

    fn is_fatal(&self) -> bool {
        self.producer.producer().client().fatal_error().is_some()
    }

    fn purge(&self) {
        self.producer
            .producer()
            .purge(PurgeConfig::default().queue().inflight());
    }
}

/// The exactly-once forwarder's transactional producer answers the idle probe too.
impl Probe for FutureProducer<client::Context> {
    fn probe(&self, topic: &str, timeout: Duration) -> bool {
        answers(self.client(), topic, timeout)
    }
}

/// Whether a broker of `client`'s cluster answers a metadata request for `topic`.
pub fn answers<C: ClientContext>(client: &Client<C>, topic: &str, timeout: Duration) -> bool {
    client
        .fetch_metadata(Some(topic), timeout)
        .is_ok_and(|m| !m.brokers().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports pushed from another thread wake the waiting pump, arrive whole and in order, and
    /// a report pushed after a take wakes it again (no report waits for a timer).
    #[tokio::test]
    async fn reports_arrive_in_batches_and_every_batch_wakes_the_pump() {
        let reports = Arc::new(Reports::default());
        let mut taken = Vec::new();
        for round in 0..3_usize {
            let pusher = Arc::clone(&reports);
            let pushing = std::thread::spawn(move || {
                for token in round * 10..round * 10 + 5 {
                    pusher.push(token, Ok(()));
                }
                pusher.push(round * 10 + 5, Err(KafkaError::Canceled));
            });
            tokio::time::timeout(Duration::from_secs(10), reports.arrived())
                .await
                .expect("woken by the first report of the batch");
            pushing.join().unwrap();
            reports.take(&mut taken);
            let tokens: Vec<usize> = taken.iter().map(|(t, _)| *t).collect();
            assert_eq!(tokens, (round * 10..round * 10 + 6).collect::<Vec<_>>());
            assert!(taken[..5].iter().all(|(_, r)| r.is_ok()));
            assert!(taken[5].1.is_err());
            taken.clear();
        }
        reports.take(&mut taken);
        assert!(taken.is_empty(), "nothing is taken twice");
    }
}

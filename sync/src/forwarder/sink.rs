//! Where the at-least-once forwarder hands records: a [`Sink`]. In the daemon that is
//! librdkafka's producer ([`KafkaSink`]); the forwarder's unit tests use a fake that acks,
//! fails, hangs or refuses each record as the test says, so every transition of the
//! forwarder's state machine is tested without a broker.
//!
//! The trait is the narrow part of the producer the forwarder uses: queue a record and get its
//! delivery report later, know whether the client is beyond repair, purge what it holds, ask
//! whether a broker answers. Errors stay librdkafka's [`KafkaError`], because the forwarder
//! classifies them ([`super::poison::classify`]) the same way whoever produced them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};

use super::client;

/// A record for the sink, borrowed from the outbox record it was read as.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub headers: OwnedHeaders,
    pub timestamp_ms: i64,
}

/// The delivery report of one queued record: `Ok` once Kafka has it.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), KafkaError>> + Send>>;

/// Why a record was not queued.
pub enum Refused<'a> {
    /// The client's queue is full: the record comes back, to be offered again after a delivery.
    QueueFull(Outgoing<'a>),
    /// Refused outright (too large for the client, an unknown topic name, a fatal client, …):
    /// classified like a failed delivery.
    Error(KafkaError),
}

/// The narrow producer interface of the at-least-once forwarder.
pub trait Sink: Send + Sync {
    /// Queues a record; its delivery report arrives through the returned future.
    fn send<'a>(&self, record: Outgoing<'a>) -> Result<Delivery, Refused<'a>>;

    /// The client hit a fatal error: nothing more will be delivered by it.
    fn is_fatal(&self) -> bool;

    /// Fails every record the client holds (their reports arrive as errors).
    fn purge(&self);

    /// Whether a broker answers a metadata request for `topic` within `timeout`. Blocking.
    fn probe(&self, topic: &str, timeout: Duration) -> bool;
}

/// librdkafka's producer as the forwarder's sink.
pub struct KafkaSink {
    pub(super) producer: FutureProducer<client::Context>,
}

impl Sink for KafkaSink {
    fn send<'a>(&self, record: Outgoing<'a>) -> Result<Delivery, Refused<'a>> {
        let Outgoing {
            topic,
            key,
            payload,
            headers,
            timestamp_ms,
        } = record;
        let mut kafka_record = FutureRecord::<str, [u8]>::to(topic)
            .payload(payload)
            .headers(headers)
            .timestamp(timestamp_ms);
        if let Some(key) = key {
            kafka_record = kafka_record.key(key);
        }
        match self.producer.send_result(kafka_record) {
            Ok(delivery) => Ok(Box::pin(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    // The producer went away with the record.
                    Err(_) => Err(KafkaError::Canceled),
                }
            })),
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

    fn is_fatal(&self) -> bool {
        self.producer.client().fatal_error().is_some()
    }

    fn purge(&self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    fn probe(&self, topic: &str, timeout: Duration) -> bool {
        self.producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok_and(|m| !m.brokers().is_empty())
    }
}

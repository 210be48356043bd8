//! Outpost's cloud-sync half: the [`forwarder`] reads the outbox (crate `outpost-outbox`,
//! re-exported here) and produces to Kafka, deleting a record only after Kafka acknowledged it;
//! its [`forwarder::rules`] decide each record's Kafka topic and key, and
//! [`forwarder::poison`] what Kafka refuses for good.

#![forbid(unsafe_code)]

pub mod forwarder;

pub use outpost_outbox::{
    AckError, AppendError, Envelope, FullReason, OpenError, Outbox, OutboxMetrics, OutboxOptions,
    OutboxReader, OutboxWriter, ReadPosition, Source, StoredRecord,
};
pub use outpost_outbox::{envelope, outbox, sqlite};

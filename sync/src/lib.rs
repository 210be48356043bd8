//! Outpost's storage and cloud-sync half.
//!
//! Everything that reaches the gateway becomes one [`Envelope`], and every envelope goes through
//! the [`outbox`]: a SQLite file that is the single source of truth between ingestion and the
//! cloud. The outbox keeps three promises of the shared contract:
//!
//! * **acknowledged means durable** — an append completes only after its transaction committed;
//! * **bounded, never silent** — a byte cap and a free-disk floor, with a per-route policy
//!   (`reject` or `drop_oldest`) that is counted and logged;
//! * **crash-safe** — `kill -9` loses no completed append; a corrupt file is quarantined, not
//!   crash-looped on.
//!
//! The [`forwarder`] reads the outbox and produces to Kafka, deleting a record only after Kafka
//! acknowledged it; its [`forwarder::rules`] decide each record's Kafka topic and key.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod forwarder;
pub mod outbox;
pub mod sqlite;

pub use envelope::{Envelope, Source, StoredRecord};
pub use outbox::{
    AckError, AppendError, FullReason, OpenError, Outbox, OutboxMetrics, OutboxOptions,
    OutboxReader, OutboxWriter, ReadPosition,
};

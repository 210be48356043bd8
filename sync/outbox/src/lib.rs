//! Outpost's durable outbox: every record that reaches the gateway becomes one [`Envelope`], and
//! every envelope goes through the [`outbox`] — a SQLite file that is the single source of truth
//! between ingestion and the cloud. It keeps three promises of the shared contract:
//!
//! * **acknowledged means durable** — an append completes only after its transaction committed;
//! * **bounded, never silent** — a byte cap and a free-disk floor, with a per-route policy
//!   (`reject` or `drop_oldest`) that is counted and logged, and a disk reserve so a full disk
//!   never stops deletes;
//! * **crash-safe** — `kill -9` loses no completed append; a corrupt file is quarantined, not
//!   crash-looped on.
//!
//! A crate of its own so that it and its tests build without librdkafka: the Kafka forwarder
//! (`outpost-sync`) reads it through [`OutboxReader`] and [`Outbox::ack`].

#![forbid(unsafe_code)]

pub mod envelope;
pub mod outbox;
pub mod sqlite;

pub use envelope::{Envelope, Source, StoredRecord};
pub use outbox::{
    AckError, AppendError, FullReason, OpenError, Outbox, OutboxMetrics, OutboxOptions,
    OutboxReader, OutboxWriter, ReadPosition,
};

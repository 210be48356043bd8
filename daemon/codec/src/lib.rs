//! The ingress wire formats that face the network, free of I/O and of the daemon's state: what
//! HTTP and CoAP ingestion read before anything is authenticated or stored.
//!
//! * [`body`]: request bodies (JSON, CBOR, SenML, text) split into records that are slices of
//!   the body itself.
//! * [`coap`]: CoAP datagrams classified (process, Reset, ignore) and their options read.
//!
//! A crate of its own so the fuzz targets (`fuzz/`) import exactly the code the daemon runs,
//! without building the daemon (librdkafka, SQLite, the container client) under libFuzzer.
//! The MQTT codec lives in `outpost-mqtt` for the same reason.

#![forbid(unsafe_code)]

pub mod body;
pub mod coap;

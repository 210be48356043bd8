//! Outpost's MQTT server.

#![forbid(unsafe_code)]

pub mod acl;
pub mod backend;
pub mod broker;
pub mod codec;
pub mod connection;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod settings;
pub mod store;
pub mod tls;
pub mod topic;

#[cfg(test)]
mod tests;

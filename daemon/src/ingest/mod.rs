//! Ingress: everything that turns outside input into envelopes for the outbox.

pub mod drivers;

//! Logs and metrics.

pub mod drivers;
pub mod logging;
pub mod metrics;

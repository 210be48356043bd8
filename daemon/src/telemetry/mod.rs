//! Logs and metrics.

pub mod apps;
pub mod drivers;
pub mod logging;
pub mod metrics;

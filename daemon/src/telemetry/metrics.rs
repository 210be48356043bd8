//! The Prometheus registry. Subsystems register their own metrics here at startup; the admin
//! listener encodes it on every scrape. Encoding never blocks the data path: metrics are atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub arch: String,
}

/// Creates the registry with the process-wide metrics.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
        })
        .set(1);
    registry.register("outpost_build_info", "Outpost build information", build);
    registry
}

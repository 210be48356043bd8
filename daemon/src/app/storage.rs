//! Storage, opened first: nothing may be accepted before the outbox is open.

use std::path::Path;

use anyhow::Context;
use outpost_config::Config;
use outpost_sync::{Outbox, OutboxOptions, outbox};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use crate::registry::Registry;
use crate::status::StatusBoard;

/// The outbox with its writer task, and the device registry.
pub struct Storage {
    pub outbox: Outbox,
    pub registry: Registry,
    /// The outbox writer. The gateway is useless without it: `run` stops when it ends.
    pub writer: JoinHandle<anyhow::Result<()>>,
    /// Stops the writer: the last step of a shutdown, after ingress has drained into it.
    pub writer_stop: CancellationToken,
}

impl Storage {
    /// Opens `outbox.db` (moving a corrupt file aside, with an alarm), starts its writer, then
    /// opens `registry.db` the same way.
    pub async fn open(
        config: &Config,
        spawner: &Spawner,
        metrics: &mut MetricsRegistry,
    ) -> anyhow::Result<Self> {
        let status = &spawner.status;
        let options = OutboxOptions::from_config(config);
        let (outbox, writer) = tokio::task::spawn_blocking(move || outbox::open(options))
            .await
            .context("opening the outbox")??;
        outbox.metrics().register(metrics);
        if let Some(q) = outbox.quarantine() {
            quarantined(status, "outbox", &q.moved_to, &q.reason);
        }
        status.active("outbox", true);
        status.watch_outbox(outbox.clone());
        let writer_stop = CancellationToken::new();
        let writing = writer.run(writer_stop.clone());
        let writer = spawner.spawn("outbox-writer", async move {
            writing.await.map_err(anyhow::Error::from)
        });

        let registry = {
            let (dir, offline_after) = (config.data_dir(), config.devices.offline_after);
            tokio::task::spawn_blocking(move || Registry::open(&dir, offline_after))
                .await
                .context("opening the device registry")??
        };
        if let Some(q) = registry.quarantine() {
            quarantined(status, "registry", &q.moved_to, &q.reason);
        }
        registry.limit_automatic(config.devices.max_automatic);
        registry.register_metrics(metrics);
        status.watch_alarm("registry", {
            let registry = registry.clone();
            move || registry.alarm()
        });
        status.active("registry", true);
        Ok(Self {
            outbox,
            registry,
            writer,
            writer_stop,
        })
    }

    /// Saves device monitoring figures periodically until the returned token is cancelled (with
    /// a final save): cancelled once ingress has drained, so the last figures include the last
    /// readings.
    pub fn spawn_registry_flush(&self, spawner: &Spawner) -> CancellationToken {
        let stop = CancellationToken::new();
        spawner.status.active("registry-flush", false);
        let (registry, flush_stop) = (self.registry.clone(), stop.clone());
        spawner.supervise(
            "registry-flush",
            "registry-flush",
            false,
            stop.clone(),
            move || registry.clone().run_flusher(flush_stop.clone()),
        );
        stop
    }
}

/// The standing alarm of a store whose corrupt file was moved aside at open (it starts empty).
fn quarantined(status: &StatusBoard, store: &str, moved_to: &Path, reason: &str) {
    status.alarm(
        store,
        format!("corrupt {store} moved to {}: {reason}", moved_to.display()),
    );
}

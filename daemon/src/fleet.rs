//! The gateway's side of the fleet topics (heartbeats and inventory, see
//! `outpost_sync::forwarder::fleet`): the facts a heartbeat reports. Reading the fleet back
//! (`outpost fleet watch`) is a client, in `cli::fleet_watch`.

use outpost_sync::forwarder::fleet::FleetSource;

use crate::registry::{ListQuery, Registry};
use crate::status::StatusBoard;

/// What a heartbeat reports about this gateway: its subsystems and its devices.
pub struct GatewayFacts {
    pub registry: Registry,
    pub status: StatusBoard,
}

impl FleetSource for GatewayFacts {
    fn subsystems(&self) -> serde_json::Value {
        self.status
            .subsystems()
            .into_iter()
            .map(|s| {
                let state = serde_json::to_value(s.state).unwrap_or_default();
                (s.name, state)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn inventory(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let query = ListQuery {
                tag: None,
                state: None,
                limit: crate::registry::MAX_PAGE,
                cursor: cursor.take(),
            };
            let Ok(page) = self.registry.list(&query) else {
                return out;
            };
            for d in page.devices {
                // Describing fields only: monitoring (state, last seen) changes with traffic and
                // is not an inventory change.
                let value = serde_json::json!({
                    "id": d.id,
                    "name": d.name,
                    "model": d.model,
                    "batch": d.batch,
                    "firmware": d.firmware,
                    "location": d.location,
                    "tags": d.tags,
                    "enabled": d.enabled,
                    "protocols": d.protocols,
                    "source": d.source,
                    "created_at_ms": d.created_at_ms,
                    "updated_at_ms": d.updated_at_ms,
                });
                out.push((d.id, value));
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return out,
            }
        }
    }
}

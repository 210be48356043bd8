//! What several outbox integration tests share.

use std::sync::Arc;

use outpost_outbox::{Envelope, Source};

/// A small reading of device `d` on the default route, its payload the counter `n`.
pub fn reading(n: u32) -> Envelope {
    Envelope {
        route: Arc::from("default"),
        device_id: "d".into(),
        source: Source::Mqtt,
        topic: "t".into(),
        received_at_ms: 0,
        content_type: None,
        headers: vec![],
        payload: n.to_string().into_bytes().into(),
        priority: None,
    }
}

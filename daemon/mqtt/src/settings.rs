//! What the server takes from `[mqtt]`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use outpost_config::{MqttConfig, MqttLimitsConfig, MqttSessionsConfig, WhenFull};

/// The server's settings (see `config/src/model/mqtt.rs` for each one's meaning).
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_connections: usize,
    /// The largest packet a client may send (the server's Maximum Packet Size).
    pub max_packet: usize,
    /// PUBLISHes of one connection awaiting their commit at once (the server's Receive
    /// Maximum).
    pub max_inflight_in: u16,
    pub topic_alias_maximum: u16,
    pub connect_timeout: Duration,
    pub max_pending_handshakes: usize,
    pub max_pending_per_address: usize,
    pub allow_anonymous: bool,
    pub max_retained: usize,
    pub sessions: MqttSessionsConfig,
    pub limits: MqttLimitsConfig,
    /// The gateway's ingress byte budget (`gateway.max_ingress_bytes`), shared with the other
    /// ingress paths; `None`: unbounded (the crate's own tests).
    pub budget: Option<Budget>,
}

/// An ingress byte budget: a semaphore whose permits are payload bytes. A PUBLISH holds its
/// payload's bytes from the moment it is read until its commit is answered; while they cannot
/// be granted the connection reads nothing more (back-pressure on the socket).
#[derive(Debug, Clone)]
pub struct Budget {
    pub bytes: Arc<Semaphore>,
    /// The budget's size: a payload larger than it asks for all of it (config validation keeps
    /// `mqtt.max_packet` within it), so no request waits forever.
    pub total: usize,
}

impl Budget {
    /// The permits a payload of `len` bytes takes.
    pub fn permits(&self, len: usize) -> u32 {
        u32::try_from(len.min(self.total)).unwrap_or(u32::MAX)
    }
}

impl Settings {
    pub fn from_config(c: &MqttConfig) -> Settings {
        Settings {
            max_connections: c.max_connections,
            max_packet: usize::try_from(c.max_packet.bytes()).unwrap_or(usize::MAX),
            max_inflight_in: u16::try_from(c.max_inflight.clamp(1, 65_535)).unwrap_or(u16::MAX),
            topic_alias_maximum: c.topic_alias_maximum,
            connect_timeout: c.connect_timeout,
            max_pending_handshakes: c.max_pending_handshakes.max(1),
            max_pending_per_address: c.max_pending_per_address.max(1),
            allow_anonymous: c.allow_anonymous,
            max_retained: c.max_retained,
            sessions: c.sessions.clone(),
            limits: c.limits.clone(),
            budget: None,
        }
    }

    /// The longest session expiry the server grants, in seconds.
    pub fn max_expiry(&self) -> u32 {
        u32::try_from(self.sessions.max_expiry.as_secs()).unwrap_or(u32::MAX)
    }

    /// Whether a full session queue drops its oldest unsent message (else: refuse).
    pub fn drop_oldest(&self) -> bool {
        self.sessions.when_full == WhenFull::DropOldest
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&MqttConfig::default())
    }
}

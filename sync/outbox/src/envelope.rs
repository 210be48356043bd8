//! The unit of data on Outpost's data path.
//!
//! An [`Envelope`] is what an ingress hands to the outbox; a [`StoredRecord`] is what the outbox
//! hands back to the forwarder, with the gateway sequence and boot id it was given on commit.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

/// Where a reading entered the gateway. Stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Mqtt,
    Coap,
    Http,
    Driver,
    /// Records the gateway writes itself: status events of commands from the cloud. Rules do
    /// not apply to them; they go to `kafka.commands.status_topic`.
    Gateway,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Coap => "coap",
            Source::Http => "http",
            Source::Driver => "driver",
            Source::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mqtt" => Ok(Source::Mqtt),
            "coap" => Ok(Source::Coap),
            "http" => Ok(Source::Http),
            "driver" => Ok(Source::Driver),
            "gateway" => Ok(Source::Gateway),
            other => Err(format!("unknown source `{other}`")),
        }
    }
}

/// One reading on its way into the outbox.
///
/// `device_id` is always the *authenticated* identity of the sender (contract point 5), never
/// what a payload claims. `received_at_ms` is the wall clock at receipt and is informational
/// only: ordering uses the gateway sequence assigned on commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub route: Arc<str>,
    pub device_id: String,
    pub source: Source,
    pub topic: String,
    pub received_at_ms: i64,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The payload as received. Shared, not copied: an MQTT payload is a slice of the decoded
    /// packet's buffer, an HTTP record a slice of the request body, from decoding until SQLite
    /// has it (and the local readings stream shares it too).
    pub payload: Bytes,
    /// Forwarding priority overriding the route's (set by a `[[kafka.rules]]` priority).
    pub priority: Option<u8>,
}

/// Bytes every record is charged beyond its variable-length fields: the row header, the sequence,
/// the index entry. The byte cap counts this so that many tiny records cannot exceed the disk
/// budget unnoticed.
pub const RECORD_OVERHEAD_BYTES: u64 = 64;

impl Envelope {
    /// The bytes this record is charged against the outbox byte cap.
    pub fn accounted_size(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum();
        (self.payload.len()
            + self.topic.len()
            + self.device_id.len()
            + self.route.len()
            + self.content_type.as_deref().map_or(0, str::len)
            + headers) as u64
            + RECORD_OVERHEAD_BYTES
    }
}

/// A committed record as read back from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Gateway sequence: strictly increasing over the life of the outbox file, never reused.
    pub seq: u64,
    pub priority: u8,
    pub route: String,
    /// The kernel boot id of the boot during which the record was received.
    pub boot_id: Arc<str>,
    pub device_id: String,
    pub source: Source,
    pub topic: String,
    pub received_at_ms: i64,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    /// Bytes charged against the byte cap (see [`Envelope::accounted_size`]).
    pub size: u64,
}

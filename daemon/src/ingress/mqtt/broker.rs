//! The embedded rumqttd broker: routing, subscriptions, retained messages, wills and sessions.
//!
//! It listens on loopback only, on a port picked at start, and accepts exactly one user: the
//! front, with a password drawn at random for this boot. Devices never reach it directly. The
//! gateway's own publishes (the local bus, [`crate::ingress::bus`]) use an in-process link
//! created here before the broker serves.
//!
//! Memory bound: rumqttd keeps a log per subscribed filter of at most
//! `max_segment_count × max_segment_size` bytes; here 2 × `mqtt.max_packet` (512 KiB with the
//! default 256 KiB), instead of rumqttd's example 100 × 100 MB. With one filter per device
//! (its commands) and `max_connections` devices that is the worst case; segments fill only with
//! messages actually routed, so an idle gateway holds almost nothing.
//!
//! rumqttd runs its router and its server on threads of its own (`rumqttd` names them); they live
//! until the process exits — the front, not the broker, is what stops on shutdown.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// The front's login at the broker.
pub const FRONT_USER: &str = "outpost-front";

/// A running broker: where it listens and the secret it demands.
#[derive(Clone)]
pub struct BrokerHandle {
    pub addr: SocketAddr,
    pub secret: String,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts the broker (MQTT 3.1.1 server) on an ephemeral loopback port, with the local bus's
/// link. The listener is bound here and handed to rumqttd (`rumqttd::provide_listener`, a patch
/// of the vendored copy), so the port is ours from the start.
///
/// rumqttd cannot be restarted in-process (its router and the bus link are created together),
/// so the returned receiver resolves with the reason if the broker ever stops: the caller marks
/// the essential subsystem `mqtt-broker` INACTIVE, which stops the systemd watchdog and makes
/// systemd restart the daemon.
pub fn start(
    max_connections: usize,
    max_packet: usize,
) -> std::io::Result<(
    BrokerHandle,
    crate::ingress::bus::BusLink,
    tokio::sync::oneshot::Receiver<String>,
)> {
    let addr = rumqttd::provide_listener(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?)?;
    let secret = crate::registry::secrets::generate();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: max_packet,
        max_inflight_count: 100,
        auth: Some(HashMap::from([(FRONT_USER.to_owned(), secret.clone())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "mqtt-broker-v4".to_owned(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // One more for the local bus's link.
            max_connections: max_connections + 1,
            max_outgoing_packet_count: 200,
            max_segment_size: max_packet.max(64 * 1024),
            max_segment_count: 2,
            ..Default::default()
        },
        v4: Some(HashMap::from([("front".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    let (tx, rx) = broker
        .link(crate::ingress::bus::LINK_CLIENT_ID)
        .map_err(|e| std::io::Error::other(format!("local link to the broker: {e}")))?;
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    let fail_now = crate::supervisor::fault_requested("mqtt-broker");
    std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            let why = if fail_now {
                "fault injected by OUTPOST_DEBUG_FAIL".to_owned()
            } else {
                match broker.start() {
                    Ok(()) => "stopped".to_owned(),
                    Err(e) => e.to_string(),
                }
            };
            let _ = stopped_tx.send(why);
        })?;
    Ok((
        BrokerHandle { addr, secret },
        crate::ingress::bus::BusLink::new(tx, rx),
        stopped,
    ))
}

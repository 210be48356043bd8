//! Debian's `mosquitto_sub` as a device waiting for its commands.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::daemon::Daemon;

/// `mosquitto_sub` (MQTT 5) as `device` on its command topics (`devices/<device>/commands/#`,
/// QoS 1), printing `count` messages with the output `format` (`-F`: `%p` the payload, `%t` the
/// topic, `%R` the response topic, `%D` the correlation data, `%P` the user properties), giving
/// up after 30 s. Returns once the daemon has granted the subscription.
pub fn subscribe_commands(
    d: &mut Daemon,
    addr: SocketAddr,
    device: &str,
    secret: &str,
    count: usize,
    format: &str,
) -> Child {
    let topic = format!("devices/{device}/commands/#");
    subscribe(d, addr, (device, secret), &topic, count, format)
}

/// `mosquitto_sub` (MQTT 5, QoS 1) as `device` (its id and secret) on `filter`, printing
/// `count` messages with `format`, giving up after 30 s; returns once the subscription is
/// granted.
pub fn subscribe(
    d: &mut Daemon,
    addr: SocketAddr,
    (device, secret): (&str, &str),
    filter: &str,
    count: usize,
    format: &str,
) -> Child {
    let before = d.metric("outpost_mqtt_subacks_total");
    let child = Command::new("mosquitto_sub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-V", "5", "-u", device, "-P", secret])
        .args(["-i", &format!("{device}-sub")])
        .args(["-q", "1", "-t", filter])
        .args(["-F", format, "-W", "30", "-C", &count.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_sub");
    d.wait_until("the subscription", Duration::from_secs(5), |d| {
        d.metric("outpost_mqtt_subacks_total") > before
    });
    child
}

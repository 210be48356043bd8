//! The request shapes the registry accepts: the bodies of `POST /api/v1/devices` and
//! `PATCH /api/v1/devices/{id}`, deserialized by the API (unknown fields refused) and checked
//! by the registry itself ([`super::Registry::create`], [`super::Registry::update`]), so a
//! device is valid however it was created (API, CLI, drivers' auto-registration).

use serde::Deserialize;

use super::Protocol;

/// A new device (the body of `POST /api/v1/devices`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// `[A-Za-z0-9._:-]{1,128}`.
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub batch: String,
    #[serde(default)]
    pub firmware: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Default: all protocols.
    #[serde(default = "all_protocols")]
    pub protocols: Vec<Protocol>,
    /// Default (absent or null): the global `[mqtt.acl]` `publish`.
    #[serde(default)]
    pub mqtt_publish: Option<Vec<String>>,
    /// Default (absent or null): the global `[mqtt.acl]` `subscribe`.
    #[serde(default)]
    pub mqtt_subscribe: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

fn all_protocols() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

/// Changes to a device (the body of `PATCH /api/v1/devices/{id}`); absent fields are kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceChanges {
    pub name: Option<String>,
    pub model: Option<String>,
    pub batch: Option<String>,
    pub firmware: Option<String>,
    pub location: Option<String>,
    pub tags: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub protocols: Option<Vec<Protocol>>,
    /// Absent: kept; `null`: back to the global `[mqtt.acl]`; a list: the device's own.
    #[serde(default, deserialize_with = "present")]
    pub mqtt_publish: Option<Option<Vec<String>>>,
    /// Like `mqtt_publish`.
    #[serde(default, deserialize_with = "present")]
    pub mqtt_subscribe: Option<Option<Vec<String>>>,
}

/// Tells a field given as `null` (`Some(None)`) from an absent one (`None`, the default).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

//! `[mqtt.tls]`: the MQTT server's TLS listener.
//!
//! Checked here: what the text alone can tell (files named when required, `client_auth` only
//! with a CA). Whether the files exist and hold a usable certificate and key is checked by the
//! daemon when it loads the config (`outpost check-config` and `outpost run` alike), with the
//! same key paths.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[mqtt.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt.tls] table")]
pub struct MqttTlsConfig {
    /// Run the TLS listener beside the plain one (`mqtt.enabled` must be on). Default `false`.
    pub enabled: bool,
    /// TCP address of the TLS listener as `IP:port`. Default `"0.0.0.0:8883"`; port 0 picks a
    /// free port.
    #[serde(with = "crate::model::socket_addr")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM, leaf first). Required when enabled.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert_file`. Required when enabled.
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign device client certificates. A device presenting a
    /// certificate it signed, whose subject CN or a SAN DNS name is a registered device id, is
    /// that device without a password. Default: none (client certificates not requested).
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `"optional"` (default; devices without a certificate log in with
    /// their password) or `"required"` (the handshake fails without a valid certificate).
    pub client_auth: ClientAuth,
}

impl Default for MqttTlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: ClientAuth::Optional,
        }
    }
}

/// `mqtt.tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client certificate is verified when presented; none is fine.
    #[default]
    Optional,
    /// The TLS handshake fails without a valid client certificate.
    Required,
}

impl MqttTlsConfig {
    /// Problems as (key under `mqtt.tls`, message).
    pub(crate) fn problems(&self, plain_listen: SocketAddr) -> Vec<(&'static str, String)> {
        let mut found = crate::model::http_tls::file_problems(
            self.enabled,
            &[
                ("cert_file", &self.cert_file, true),
                ("key_file", &self.key_file, true),
                ("client_ca_file", &self.client_ca_file, false),
            ],
        );
        if self.client_auth == ClientAuth::Required && self.client_ca_file.is_none() {
            found.push((
                "client_auth",
                "\"required\" needs client_ca_file: the CA that signs device certificates"
                    .to_owned(),
            ));
        }
        if self.enabled && self.listen.port() != 0 && self.listen == plain_listen {
            found.push((
                "listen",
                format!("the same address as mqtt.listen ({plain_listen})"),
            ));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::problem_keys as keys;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = MqttTlsConfig::default();
        assert!(!c.enabled);
        assert_eq!(c.listen.to_string(), "0.0.0.0:8883");
        assert_eq!(
            (c.cert_file, c.key_file, c.client_ca_file),
            (None, None, None)
        );
        assert_eq!(c.client_auth, ClientAuth::Optional);
    }

    #[test]
    fn parses_a_full_table() {
        let c = crate::from_toml_str(
            "[mqtt.tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert_file = \"/c.pem\"\n\
             key_file = \"/k.pem\"\nclient_ca_file = \"/ca.pem\"\nclient_auth = \"required\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.mqtt.tls.enabled);
        assert_eq!(c.mqtt.tls.client_auth, ClientAuth::Required);
        assert_eq!(c.mqtt.tls.key_file, Some(PathBuf::from("/k.pem")));
    }

    #[test]
    fn every_problem_names_its_key() {
        assert_eq!(
            keys("[mqtt.tls]\nenabled = true\nclient_auth = \"required\"\n"),
            [
                "mqtt.tls.cert_file",
                "mqtt.tls.client_auth",
                "mqtt.tls.key_file"
            ]
        );
        assert_eq!(
            keys("[mqtt.tls]\ncert_file = \"\"\n"),
            ["mqtt.tls.cert_file"]
        );
        assert_eq!(
            keys(
                "[mqtt]\nlisten = \"0.0.0.0:1883\"\n[mqtt.tls]\nenabled = true\n\
                 listen = \"0.0.0.0:1883\"\ncert_file = \"c\"\nkey_file = \"k\"\n"
            ),
            ["mqtt.tls.listen"]
        );
        assert!(keys("[mqtt.tls]\nclient_auth = \"sometimes\"\n").len() == 1);
        // Disabled: the files may be missing.
        assert!(keys("[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\n").is_empty());
    }
}

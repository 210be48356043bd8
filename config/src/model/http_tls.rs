//! `[admin.tls]` and `[http_ingest.tls]`: HTTPS on the admin listener and on the device
//! ingestion listener.
//!
//! Checked here: what the text alone can tell (files named when enabled, not empty). Whether
//! the files hold a usable certificate and key is checked by the daemon when it loads the
//! config (`outpost check-config` and `outpost run` alike), with the same key paths, by the code
//! that checks `[mqtt.tls]`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[admin.tls]`, `[http_ingest.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [*.tls] table")]
pub struct HttpTlsConfig {
    /// Serve HTTPS instead of plain HTTP on the listener. Default `false`.
    pub enabled: bool,
    /// Server certificate chain (PEM, leaf first). Required when enabled.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert_file`. Required when enabled.
    pub key_file: Option<PathBuf>,
}

impl HttpTlsConfig {
    /// Problems as (key under the table, message).
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        file_problems(
            self.enabled,
            &[
                ("cert_file", &self.cert_file, true),
                ("key_file", &self.key_file, true),
            ],
        )
    }
}

/// The problems of a TLS table's files, as (key, message): `(key, file, required)` — a path
/// must not be empty, and a required one must be set when the table is enabled. Shared with
/// `[mqtt.tls]`.
pub(crate) fn file_problems(
    enabled: bool,
    files: &[(&'static str, &Option<PathBuf>, bool)],
) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for &(key, file, required) in files {
        match file {
            Some(f) if f.as_os_str().is_empty() => {
                found.push((key, "must not be empty".to_owned()));
            }
            None if enabled && required => found.push((
                key,
                "required with enabled = true: the server certificate (PEM) and its key".to_owned(),
            )),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use crate::problem_keys as keys;

    #[test]
    fn off_by_default_and_every_problem_names_its_key() {
        let c = crate::Config::default();
        assert!(!c.admin.tls.enabled && !c.http_ingest.tls.enabled);
        assert_eq!(
            keys("[admin.tls]\nenabled = true\n"),
            ["admin.tls.cert_file", "admin.tls.key_file"]
        );
        assert_eq!(
            keys("[admin.tls]\nkey_file = \"\"\n"),
            ["admin.tls.key_file"]
        );
        // Ingestion has its own TLS only on its own listener.
        assert_eq!(
            keys("[http_ingest.tls]\nenabled = true\ncert_file = \"c\"\nkey_file = \"k\"\n"),
            ["http_ingest.tls.enabled"]
        );
        assert!(
            keys(
                "[http_ingest]\nlisten = \"127.0.0.1:8081\"\n[http_ingest.tls]\nenabled = true\n\
                 cert_file = \"c\"\nkey_file = \"k\"\n"
            )
            .is_empty()
        );
        assert!(keys("[admin.tls]\ncolour = 1\n").len() == 1);
    }
}

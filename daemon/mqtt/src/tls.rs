//! The TLS listener (`[mqtt.tls]`): rustls with the `ring` provider.
//!
//! A TLS connection is served by the same code as a plain one (the connection is generic over
//! the stream), after a handshake bounded by the CONNECT timeout. With `client_ca_file`, the
//! client certificate is verified by rustls against that CA (chain, validity, the `clientAuth`
//! usage when the certificate restricts usages); this module only reads which names the verified
//! leaf carries — its subject CN and SAN DNS names — and hands them to the backend's
//! authentication ([`crate::backend::Credentials::cert_names`]), which decides what they grant.
//!
//! The files are read by [`acceptor`], which `outpost check-config` and the start both call, so
//! an unusable file is a configuration error with its key path (exit 78).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_config::{MqttClientAuth, MqttTlsConfig, Problem};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::connection::ConnError;

/// The bound TLS listener and its configuration.
pub struct TlsListener {
    pub listener: TcpListener,
    pub acceptor: TlsAcceptor,
}

/// Builds the TLS acceptor from `[mqtt.tls]`: reads and checks the certificate, key and client
/// CA files. Every problem names its key (`mqtt.tls.cert_file`, ...).
pub fn acceptor(config: &MqttTlsConfig) -> Result<TlsAcceptor, Vec<Problem>> {
    server_config(
        "mqtt.tls",
        &TlsFiles {
            cert_file: config.cert_file.as_deref(),
            key_file: config.key_file.as_deref(),
            client_ca_file: config.client_ca_file.as_deref(),
            client_auth: config.client_auth,
        },
    )
    .map(TlsAcceptor::from)
}

/// The files of a TLS server: what [`server_config`] reads.
pub struct TlsFiles<'a> {
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    /// CA certificates that sign client certificates; `None`: none requested.
    pub client_ca_file: Option<&'a Path>,
    pub client_auth: MqttClientAuth,
}

/// The rustls server configuration (ring provider, safe default protocol versions) from
/// `files`, shared by every TLS listener of the gateway (`[mqtt.tls]`, `[admin.tls]`,
/// `[http_ingest.tls]`). Every problem names its key under `table` (`admin.tls.key_file`, ...).
pub fn server_config(table: &str, files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            path: format!("{table}.{key}"),
            message,
        });
    };
    let certs = match files.cert_file.map(read_certs) {
        Some(Ok(certs)) => Some(certs),
        Some(Err(e)) => {
            problem("cert_file", e);
            None
        }
        None => {
            problem("cert_file", "required with enabled = true".to_owned());
            None
        }
    };
    let key = match files.key_file {
        Some(path) => match PrivateKeyDer::from_pem_file(path) {
            Ok(key) => Some(key),
            Err(e) => {
                problem(
                    "key_file",
                    format!("no usable private key (PEM) in {}: {e}", path.display()),
                );
                None
            }
        },
        None => {
            problem("key_file", "required with enabled = true".to_owned());
            None
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match files.client_ca_file {
        None => None,
        Some(path) => match read_certs(path).and_then(|cas| {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca)
                    .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = match files.client_auth {
                MqttClientAuth::Optional => builder.allow_unauthenticated(),
                MqttClientAuth::Required => builder,
            };
            builder
                .build()
                .map_err(|e| format!("unusable CA certificates in {}: {e}", path.display()))
        }) {
            Ok(v) => Some(v),
            Err(e) => {
                problem("client_ca_file", e);
                None
            }
        },
    };
    let (Some(certs), Some(key)) = (certs, key) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            vec![Problem {
                path: table.to_owned(),
                message: format!("TLS setup failed: {e}"),
            }]
        })?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| {
        vec![Problem {
            path: format!("{table}.key_file"),
            message: format!("does not fit cert_file: {e}"),
        }]
    })?;
    Ok(Arc::new(server))
}

/// Binds the TLS listener when `[mqtt.tls]` enables it (the files were checked with the config;
/// they are read again here).
pub async fn bind(config: &MqttTlsConfig, backlog: usize) -> Result<Option<TlsListener>, String> {
    if !config.enabled {
        return Ok(None);
    }
    let acceptor = acceptor(config).map_err(|problems| {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        text.join("; ")
    })?;
    let listener = crate::server::bind(config.listen, backlog)
        .map_err(|e| format!("binding the MQTT TLS listener on {}: {e}", config.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("reading the MQTT TLS listener address: {e}"))?;
    tracing::info!(addr = %addr, client_ca = config.client_ca_file.is_some(), "MQTT TLS listener bound");
    Ok(Some(TlsListener { listener, acceptor }))
}

/// Every certificate (PEM) in `path`; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| {
            format!(
                "cannot read certificates (PEM) from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("no certificate (PEM) in {}", path.display()));
    }
    Ok(certs)
}

/// The next connection on `listener`, or never when there is none.
pub async fn accept(
    listener: Option<&TlsListener>,
) -> (io::Result<(TcpStream, SocketAddr)>, TlsAcceptor) {
    match listener {
        Some(l) => (l.listener.accept().await, l.acceptor.clone()),
        None => std::future::pending().await,
    }
}

/// The TLS handshake, within `timeout`; then the names of the verified client certificate
/// (none without one).
pub async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, Vec<String>), ConnError> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "MQTT TLS handshake failed");
            return Err(ConnError::Closed(format!("TLS handshake failed: {e}")));
        }
        Err(_) => return Err(ConnError::Closed("TLS handshake timed out".into())),
    };
    let names = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(|leaf| certificate_names(leaf))
        .unwrap_or_default();
    Ok((stream, names))
}

/// The subject common names and SAN DNS names of a DER certificate, in that order. Reads only
/// what it needs; anything unexpected yields fewer names, never an error (the certificate was
/// already verified by rustls).
pub fn certificate_names(cert: &[u8]) -> Vec<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    const SAN: &[u8] = &[0x55, 0x1D, 0x11]; // 2.5.29.17
    let mut names = Vec::new();
    let Some(tbs) = Der(cert)
        .expect(SEQUENCE)
        .and_then(|c| Der(c).expect(SEQUENCE))
    else {
        return names;
    };
    let mut tbs = Der(tbs);
    let mut fields = Vec::new();
    while let Some(field) = tbs.next() {
        fields.push(field);
    }
    // version [0] (optional), serial, signature, issuer, validity, subject, spki, ...
    let skip = usize::from(fields.first().is_some_and(|(tag, _)| *tag == 0xA0));
    if let Some((SEQUENCE, subject)) = fields.get(skip + 4).copied() {
        let mut rdns = Der(subject);
        while let Some((SET, rdn)) = rdns.next() {
            let mut attrs = Der(rdn);
            while let Some((SEQUENCE, attr)) = attrs.next() {
                let mut attr = Der(attr);
                if let (Some((OID, CN)), Some((tag, value))) = (attr.next(), attr.next())
                    && matches!(tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING)
                    && let Ok(name) = std::str::from_utf8(value)
                {
                    names.push(name.to_owned());
                }
            }
        }
    }
    let extensions = fields
        .iter()
        .find(|(tag, _)| *tag == 0xA3)
        .and_then(|(_, e)| Der(e).expect(SEQUENCE));
    if let Some(extensions) = extensions {
        let mut extensions = Der(extensions);
        while let Some((SEQUENCE, ext)) = extensions.next() {
            let mut ext = Der(ext);
            if ext.next() != Some((OID, SAN)) {
                continue;
            }
            // `critical` is optional; the value is the last field.
            let mut value = None;
            while let Some(field) = ext.next() {
                value = Some(field);
            }
            let Some((OCTET_STRING, value)) = value else {
                continue;
            };
            let Some(general_names) = Der(value).expect(SEQUENCE) else {
                continue;
            };
            let mut general_names = Der(general_names);
            while let Some((tag, name)) = general_names.next() {
                // dNSName [2] IMPLICIT IA5String
                if tag == 0x82
                    && let Ok(name) = std::str::from_utf8(name)
                {
                    names.push(name.to_owned());
                }
            }
        }
    }
    names
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const UTF8_STRING: u8 = 0x0C;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// A cursor over DER TLVs (single-byte tags, definite lengths).
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next (tag, contents), or `None` at the end or on bad encoding.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        if tag & 0x1F == 0x1F {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7F);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(n)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, b| (len << 8) | usize::from(*b))
        };
        let (value, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some((tag, value))
    }

    /// The contents of the next TLV if it has `tag`.
    fn expect(mut self, tag: u8) -> Option<&'a [u8]> {
        self.next().filter(|(t, _)| *t == tag).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes
    /// -subj "/O=Acme/CN=pump-7" -addext "subjectAltName=DNS:pump-7.local,IP:10.0.0.1,DNS:p7"`
    const CERT: &str = include_str!("testdata/client-cert.pem");

    #[test]
    fn reads_the_common_name_then_the_san_dns_names() {
        let cert =
            CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(certificate_names(&cert), ["pump-7", "pump-7.local", "p7"]);
    }

    #[test]
    fn garbage_yields_no_names() {
        assert!(certificate_names(&[]).is_empty());
        assert!(certificate_names(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]).is_empty());
        assert!(certificate_names(&[0x30, 0x03, 0x30, 0x01]).is_empty());
        let cert =
            CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        for cut in 0..cert.len() {
            let _ = certificate_names(&cert[..cut]);
        }
    }

    #[test]
    fn missing_files_are_problems_with_their_keys() {
        let config = MqttTlsConfig {
            enabled: true,
            cert_file: Some("/nonexistent/cert.pem".into()),
            key_file: Some("/nonexistent/key.pem".into()),
            client_ca_file: Some("/nonexistent/ca.pem".into()),
            ..MqttTlsConfig::default()
        };
        let Err(problems) = acceptor(&config) else {
            panic!("accepted missing files");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mqtt.tls.cert_file",
                "mqtt.tls.key_file",
                "mqtt.tls.client_ca_file"
            ]
        );
        assert!(
            problems[0].message.contains("/nonexistent/cert.pem"),
            "{problems:?}"
        );
    }
}

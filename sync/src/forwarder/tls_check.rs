//! Why a broker's certificate was refused.
//!
//! When certificate verification fails, librdkafka reports only "certificate verify failed:
//! broker certificate could not be verified, verify that ssl.ca.location is correctly
//! configured…", whatever the cause: with OpenSSL 3.0 the handshake fails before librdkafka can
//! read the verification result, so a certificate for another host name reads like a wrong CA.
//! This check repeats the handshake with the same library (the system's OpenSSL, through the
//! `openssl` crate), the same CA file and client certificate, against the broker named in the
//! error, and reads OpenSSL's verdict: "unable to get local issuer certificate" (the CA file does
//! not hold the broker's issuer), "hostname mismatch" (with the names the certificate holds),
//! "certificate has expired", …
//!
//! It runs on its own thread, at most once per [`MIN_INTERVAL`], and only after librdkafka
//! reported a verification failure. The verdict goes to the log and, next to librdkafka's
//! error, to the status ([`LinkSignals::set_tls_reason`]).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::ssl::{HandshakeError, SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use openssl::x509::{X509Ref, X509VerifyResult};
use outpost_config::{KafkaConfig, SecurityProtocol};

use super::client::LinkSignals;

/// How often the check may run: librdkafka retries a refused broker every few seconds.
const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Connect and handshake timeout of one check.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What librdkafka's error says when the broker's certificate was refused.
const VERIFY_FAILED: &str = "certificate verify failed";

/// The TLS settings of `[kafka.security]`, and when the check last ran.
#[derive(Debug)]
pub struct TlsCheck {
    ca_file: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
    last_run: Mutex<Option<Instant>>,
}

impl TlsCheck {
    /// `None` unless the brokers are reached over TLS.
    pub fn new(kafka: &KafkaConfig) -> Option<Arc<Self>> {
        let s = &kafka.security;
        if !matches!(
            s.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        ) {
            return None;
        }
        Some(Arc::new(Self {
            ca_file: s.ca_file.clone(),
            client: s.cert_file.clone().zip(s.key_file.clone()),
            last_run: Mutex::new(None),
        }))
    }

    /// Called with each librdkafka error: after a certificate verification failure, checks the
    /// broker it names on a thread of its own (unless a check ran within [`MIN_INTERVAL`]).
    pub fn after_error(self: &Arc<Self>, error: &str, signals: &Arc<LinkSignals>) {
        if !error.contains(VERIFY_FAILED) {
            return;
        }
        let Some(broker) = broker_address(error) else {
            return;
        };
        {
            let Ok(mut last) = self.last_run.lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < MIN_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (check, signals, broker) = (Arc::clone(self), Arc::clone(signals), broker.to_owned());
        let spawned = std::thread::Builder::new()
            .name("kafka-tls-check".into())
            .spawn(move || {
                if let Err(reason) = check.verify(&broker) {
                    tracing::warn!(broker, reason, "Kafka broker's certificate refused");
                    signals.set_tls_reason(format!("{broker}: {reason}"));
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("cannot start the TLS check: {e}");
        }
    }

    /// A TLS handshake with `broker` (`host:port`) as librdkafka makes it; `Err` says why the
    /// broker's certificate is refused (or why the check could not tell).
    fn verify(&self, broker: &str) -> Result<(), String> {
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| format!("cannot set up the TLS check: {e}"))?;
        if let Some(ca) = &self.ca_file {
            builder
                .set_ca_file(ca)
                .map_err(|e| format!("cannot load ca_file {}: {e}", ca.display()))?;
        }
        if let Some((cert, key)) = &self.client {
            builder
                .set_certificate_chain_file(cert)
                .and_then(|()| builder.set_private_key_file(key, SslFiletype::PEM))
                .map_err(|e| format!("cannot load the client certificate: {e}"))?;
        }
        let host = broker
            .rsplit_once(':')
            .map_or(broker, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        // The names of the broker's certificate, read while OpenSSL verifies it: after a failed
        // handshake the peer certificate is no longer available.
        let presented = Arc::new(Mutex::new(None));
        builder.set_verify_callback(SslVerifyMode::PEER, {
            let presented = Arc::clone(&presented);
            move |ok, store| {
                if store.error_depth() == 0
                    && let Some(cert) = store.current_cert()
                    && let Ok(mut slot) = presented.lock()
                {
                    *slot = Some(names(cert));
                }
                ok
            }
        });
        let tcp = connect(broker).map_err(|e| format!("cannot connect to check TLS: {e}"))?;
        let config = builder
            .build()
            .configure()
            .map_err(|e| format!("cannot set up the TLS check: {e}"))?;
        match config.connect(host, tcp) {
            Ok(_) => Ok(()),
            Err(HandshakeError::Failure(mid)) => {
                let verdict = mid.ssl().verify_result();
                if verdict == X509VerifyResult::OK {
                    return Err(format!("TLS handshake failed: {}", mid.error()));
                }
                let mut reason = verdict.error_string().to_owned();
                if let Some(names) = presented.lock().ok().and_then(|mut n| n.take()) {
                    reason.push_str(&format!(" (the certificate is for {names})"));
                }
                Err(reason)
            }
            Err(e) => Err(format!("TLS handshake failed: {e}")),
        }
    }
}

/// The `host:port` of the broker a librdkafka error names: `ssl://host:port/id: …` or
/// `sasl_ssl://host:port/bootstrap: …`.
fn broker_address(error: &str) -> Option<&str> {
    let (_, rest) = error.split_once("ssl://")?;
    let end = rest.find('/')?;
    Some(&rest[..end]).filter(|address| !address.is_empty())
}

fn connect(broker: &str) -> std::io::Result<TcpStream> {
    let addresses: Vec<SocketAddr> = broker.to_socket_addrs()?.collect();
    let mut last = std::io::Error::other("the name resolves to no address");
    for address in addresses {
        match TcpStream::connect_timeout(&address, TIMEOUT) {
            Ok(tcp) => {
                tcp.set_read_timeout(Some(TIMEOUT))?;
                tcp.set_write_timeout(Some(TIMEOUT))?;
                return Ok(tcp);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The names a certificate is for: its subject alternative names, else its common name.
fn names(cert: &X509Ref) -> String {
    let mut names: Vec<String> = cert
        .subject_alt_names()
        .into_iter()
        .flatten()
        .filter_map(|name| {
            if let Some(dns) = name.dnsname() {
                Some(format!("DNS:{dns}"))
            } else {
                name.ipaddress().and_then(|ip| match ip.len() {
                    4 => <[u8; 4]>::try_from(ip)
                        .ok()
                        .map(|b| format!("IP:{}", std::net::Ipv4Addr::from(b))),
                    16 => <[u8; 16]>::try_from(ip)
                        .ok()
                        .map(|b| format!("IP:{}", std::net::Ipv6Addr::from(b))),
                    _ => None,
                })
            }
        })
        .collect();
    if names.is_empty() {
        names.extend(
            cert.subject_name()
                .entries_by_nid(openssl::nid::Nid::COMMONNAME)
                .map(|entry| format!("CN={}", String::from_utf8_lossy(entry.data().as_slice()))),
        );
    }
    if names.is_empty() {
        "no name".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_is_read_from_librdkafkas_error() {
        let error = "Global error: SSL (Local: SSL error): ssl://127.0.0.1:43475/bootstrap: SSL \
                     handshake failed: error:0A000086:SSL routines::certificate verify failed";
        assert_eq!(broker_address(error), Some("127.0.0.1:43475"));
        assert_eq!(
            broker_address("sasl_ssl://kafka.example:9093/2: SSL handshake failed"),
            Some("kafka.example:9093")
        );
        assert_eq!(broker_address("1/1 brokers are down"), None);
    }
}

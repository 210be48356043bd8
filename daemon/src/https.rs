//! HTTPS for the admin and ingestion listeners (`[admin.tls]`, `[http_ingest.tls]`): an
//! [`axum::serve::Listener`] that hands axum connections whose TLS handshake is done.
//!
//! axum accepts one connection at a time, so a handshake done inside `accept` would let one
//! slow or silent client hold every other one back. Here a task of its own accepts TCP
//! connections and runs each handshake in a task, at most [`MAX_HANDSHAKES`] at once and each
//! within [`HANDSHAKE_TIMEOUT`]; finished connections wait in a channel for axum. A failed
//! handshake is logged at debug level and counted nowhere else: it is a client's problem, like a
//! malformed request line.
//!
//! Requests carry the peer's address as `ConnectInfo<SocketAddr>`, exactly as on a plain
//! listener, so the monitoring rule (loopback without a token) reads the same extension.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// TLS handshakes in progress at once; more wait in the kernel's accept queue.
pub const MAX_HANDSHAKES: usize = 64;
/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls acceptor for an HTTP listener's `[*.tls]` table (`table` names it in problems):
/// HTTP/1.1 offered by ALPN, no client certificates (the API authenticates with tokens, devices
/// with their secrets).
pub fn acceptor(
    table: &str,
    config: &outpost_config::HttpTlsConfig,
) -> Result<TlsAcceptor, Vec<outpost_config::Problem>> {
    let server = outpost_mqtt::tls::server_config(
        table,
        &outpost_mqtt::tls::TlsFiles {
            cert_file: config.cert_file.as_deref(),
            key_file: config.key_file.as_deref(),
            client_ca_file: None,
            client_auth: outpost_config::MqttClientAuth::Optional,
        },
    )?;
    let mut server = Arc::unwrap_or_clone(server);
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// A TCP listener whose connections come out TLS-established.
pub struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    /// The accepting task; it ends with this listener.
    accepting: tokio::task::JoinHandle<()>,
}

impl HttpsListener {
    /// Starts accepting on `listener` (on the current runtime).
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let accepting = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(Self {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: axum's own listener waits a second too.
                    tracing::warn!(error = %e, "Accepting an HTTPS connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The peer of an HTTPS connection, as axum's connect info; [`peer_as_socket_addr`] turns it
/// into the `ConnectInfo<SocketAddr>` the routes read.
#[derive(Debug, Clone, Copy)]
pub struct HttpsPeer(SocketAddr);

impl Connected<IncomingStream<'_, HttpsListener>> for HttpsPeer {
    fn connect_info(stream: IncomingStream<'_, HttpsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// Marks a request that came over HTTPS (session cookies are then `Secure`).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Middleware: `ConnectInfo<HttpsPeer>` → `ConnectInfo<SocketAddr>`, and the [`OverTls`] mark.
pub async fn peer_as_socket_addr(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(ConnectInfo(HttpsPeer(peer))) = request
        .extensions()
        .get::<ConnectInfo<HttpsPeer>>()
        .copied()
    {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(OverTls);
    }
    next.run(request).await
}

/// Debian's CA bundle (package `ca-certificates`): what the CLI and webhooks trust by default.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The certificates of a PEM file (a CA bundle), for ureq's rustls; the error says why none.
pub fn pem_roots(path: &std::path::Path) -> Result<ureq::tls::RootCerts, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) = item.map_err(|e| e.to_string())? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err("no certificate (PEM) in it".to_owned());
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

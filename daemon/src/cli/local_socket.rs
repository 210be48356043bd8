//! The CLI's way to the daemon on the same machine: HTTP/1.1 over the local admin socket
//! (`admin.socket`, see `crate::local_admin`), with hyper's client on a current-thread runtime.
//! No token: the socket's permissions decide who may use it.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A connection target: the socket's path.
#[derive(Debug, Clone)]
pub struct LocalSocket {
    pub path: PathBuf,
}

/// Why the socket cannot be used.
#[derive(Debug)]
pub enum Unusable {
    /// No socket at the path (the daemon is not running there, or has none).
    Absent,
    /// The socket exists but this user may not open it.
    Denied,
    Other(String),
}

impl LocalSocket {
    /// The socket at `path`, if this process can connect to it now.
    pub fn probe(path: &Path) -> Result<LocalSocket, Unusable> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Ok(LocalSocket {
                path: path.to_path_buf(),
            }),
            Err(e) => match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    Err(Unusable::Absent)
                }
                std::io::ErrorKind::PermissionDenied => Err(Unusable::Denied),
                _ => Err(Unusable::Other(e.to_string())),
            },
        }
    }

    /// One request: `(status, body)`.
    pub fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<String>,
    ) -> Result<(u16, String), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(self.send(method, path_and_query, body))
    }

    async fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<String>,
    ) -> Result<(u16, String), String> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.path.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            sender.send_request(request),
        )
        .await
        .map_err(|_| "no answer within 30 s".to_owned())?
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

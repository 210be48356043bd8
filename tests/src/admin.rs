//! Talking to the daemon's management API as an administrator: a token in the config, requests
//! with it, devices created through it.

use base64::Engine;

use crate::daemon::Daemon;
use crate::http::{Response, request};

/// The admin token [`admin_token_config`] declares.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Lowercase hex SHA-256, as `[[api.tokens]] sha256` wants it.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The device secret (64 hex digits, alone on its line) in a CLI's or the console's output.
pub fn secret_in(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no secret in:\n{text}"))
        .to_owned()
}

/// An `[[api.tokens]]` entry for [`ADMIN_TOKEN`] with the `admin` scope.
pub fn admin_token_config() -> String {
    format!(
        "[[api.tokens]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
        sha256_hex(ADMIN_TOKEN)
    )
}

/// A JSON request with the admin token.
pub fn admin(d: &Daemon, method: &str, path: &str, body: &str) -> Response {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    request(
        d.admin,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

/// Registers a device (`protocols` as a JSON array, `None` for all) and returns its secret.
pub fn create_device(d: &Daemon, id: &str, protocols: Option<&str>) -> String {
    let body = match protocols {
        Some(p) => format!(r#"{{"id":"{id}","protocols":{p}}}"#),
        None => format!(r#"{{"id":"{id}"}}"#),
    };
    let r = admin(d, "POST", "/api/v1/devices", &body);
    assert_eq!(r.status, 201, "create device {id}: {}", r.text());
    let v = r.json();
    v["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("no secret in {v}"))
        .to_owned()
}

/// The HTTP `Authorization` value of a device's Basic credentials.
pub fn basic(user: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
}

/// A device posting numbered JSON records over HTTP ingestion (HTTP Basic, its own secret).
pub struct Device {
    pub id: String,
    /// The `Authorization` header value.
    pub auth: String,
    /// Next counter value to send.
    pub next: u64,
}

impl Device {
    /// Creates device `id` through the API.
    pub fn new(d: &Daemon, id: &str) -> Device {
        let secret = create_device(d, id, None);
        let auth = basic(id, &secret);
        Device {
            id: id.to_owned(),
            auth,
            next: 0,
        }
    }

    /// Posts `n` records `{"n":<counter>}` on `topic` in one request; panics unless committed.
    pub fn send(&mut self, d: &Daemon, topic: &str, n: u64) {
        let body: Vec<String> = (self.next..self.next + n)
            .map(|i| format!("{{\"n\":{i}}}"))
            .collect();
        self.next += n;
        self.post(
            d,
            topic,
            "application/json",
            format!("[{}]", body.join(",")).as_bytes(),
        );
    }

    /// Posts `body` as `content_type` on `topic` (HTTP ingestion); panics unless committed.
    pub fn post(&self, d: &Daemon, topic: &str, content_type: &str, body: &[u8]) {
        let r = request(
            d.admin,
            "POST",
            &format!("/api/v1/ingest/{topic}"),
            &[
                ("Authorization", &self.auth),
                ("Content-Type", content_type),
            ],
            body,
        );
        assert_eq!(r.status, 201, "ingest for {}: {}", self.id, r.text());
    }
}

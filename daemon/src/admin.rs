//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` and the gateway status. The REST API
//! of later issues mounts under `/api/v1` here.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outpost_sync::Outbox;
use outpost_sync::outbox::now_unix_ms;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::api::error::ApiError;
use crate::status::StatusBoard;

/// What the admin handlers read. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub gateway_id: Arc<str>,
    pub outbox: Outbox,
    pub max_bytes: u64,
    pub status: StatusBoard,
    pub registry: Arc<Registry>,
    pub started: Instant,
    /// Who may read `/metrics` and `/api/v1/status`.
    pub monitoring: MonitoringAccess,
    /// The last hour's samples (`/api/v1/status/history`).
    pub history: crate::history::History,
}

/// Who may read `/metrics` and `/api/v1/status` (`admin.public_monitoring`): anyone when
/// public; else requests from a loopback address or the local admin socket, and others with a
/// token of the `read` scope. `/healthz` and `/readyz` stay open to all (probes; they tell
/// nothing but up or ready).
#[derive(Debug, Clone)]
pub struct MonitoringAccess {
    pub public: bool,
    pub tokens: Arc<crate::api::auth::TokenSet>,
}

impl MonitoringAccess {
    /// Whether `request` may read them; the refusal otherwise.
    fn check(&self, request: &Request) -> Result<(), ApiError> {
        use axum::extract::ConnectInfo;
        if self.public {
            return Ok(());
        }
        let extensions = request.extensions();
        if extensions
            .get::<ConnectInfo<crate::local_admin::LocalPeer>>()
            .is_some()
        {
            return Ok(());
        }
        let loopback = extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .is_some_and(|ConnectInfo(peer)| match peer.ip() {
                std::net::IpAddr::V4(ip) => ip.is_loopback(),
                std::net::IpAddr::V6(ip) => {
                    ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            });
        if loopback {
            return Ok(());
        }
        if request.headers().contains_key(header::AUTHORIZATION)
            || self.tokens.sessions.presented(request.headers()).is_some()
        {
            return self
                .tokens
                .check_request(
                    request.method(),
                    request.headers(),
                    outpost_config::Scope::Read,
                )
                .map(|_| ());
        }
        Err(ApiError {
            challenge: Some("Bearer realm=\"outpost\""),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "from another host this needs a token with the read scope \
                 (admin.public_monitoring = false)",
            )
        })
    }
}

async fn guard_monitoring(State(s): State<AdminState>, request: Request, next: Next) -> Response {
    match s.monitoring.check(&request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

pub fn router(state: AdminState) -> Router {
    // The same paths as OWN_ROUTES.
    let monitoring = Router::new()
        .route(OWN_ROUTES[2].1, get(metrics))
        .route(OWN_ROUTES[3].1, get(status))
        .route(OWN_ROUTES[4].1, get(history))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_monitoring,
        ));
    Router::new()
        .route(OWN_ROUTES[0].1, get(healthz))
        .route(OWN_ROUTES[1].1, get(readyz))
        .merge(monitoring)
        .fallback(not_found)
        .with_state(state)
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: every essential subsystem is active.
async fn readyz(State(s): State<AdminState>) -> Response {
    let blocking = s.status.not_ready();
    if blocking.is_empty() {
        (StatusCode::OK, axum::Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "inactive": blocking })),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    s.outbox.refresh_gauges(now_unix_ms());
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "Encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn status(State(s): State<AdminState>) -> Response {
    axum::Json(status_document(&s)).into_response()
}

/// `/api/v1/status/history`: the last hour, sampled every 10 s (`crate::history`).
async fn history(State(s): State<AdminState>) -> Response {
    axum::Json(s.history.document()).into_response()
}

/// The gateway status as `/api/v1/status` shows it (also the result of a `report_status`
/// command from the cloud).
pub fn status_document(s: &AdminState) -> serde_json::Value {
    let (records, bytes, oldest) = s.outbox.figures();
    let disk = s
        .outbox
        .path()
        .parent()
        .and_then(crate::history::disk_bytes);
    let (dead_letters, dead_letter_bytes) = s.outbox.dead_letter_figures();
    let quarantine = s
        .outbox
        .quarantine()
        .map(|q| json!({ "moved_to": q.moved_to.display().to_string(), "reason": q.reason }));
    json!({
        "gateway_id": &*s.gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "build": {
            "version": env!("CARGO_PKG_VERSION"),
            "arch": std::env::consts::ARCH,
            "os": std::env::consts::OS,
            "outbox_schema": outpost_sync::outbox::SCHEMA_VERSION,
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "uptime_seconds": s.started.elapsed().as_secs(),
        "host": {
            "rss_bytes": crate::history::resident_bytes(),
            "disk_free_bytes": disk.map(|(free, _)| free),
            "disk_total_bytes": disk.map(|(_, total)| total),
        },
        "drivers": s.status.drivers(),
        "subsystems": s.status.subsystems(),
        "alarms": s.status.alarms(),
        "apps": s.status.apps(),
        "kafka": s.status.forwarder(),
        "mqtt": s.status.section("mqtt"),
        "config": s.status.section("config"),
        "edge": s.status.section("edge"),
        "outbox": {
            "path": s.outbox.path().display().to_string(),
            "id": s.outbox.id(),
            "synchronous": s.outbox.synchronous(),
            "records": records,
            "bytes": bytes,
            "max_bytes": s.max_bytes,
            "oldest_received_ms": oldest,
            "dead_letters": dead_letters,
            "disk_full": s.outbox.disk_full(),
            "dead_letter_bytes": dead_letter_bytes,
            "quarantined": quarantine,
        },
    })
}

/// No route for this path: the API's JSON error shape (docs/HTTP.md), like every other error.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::not_found(format!("no route {method} {}", uri.path())).into_response()
}

/// The admin listener's routes, `(method, path in axum syntax)`: its own, the management API's
/// ([`crate::api::ROUTES`]) and device ingestion's. Used to answer a wrong method with the
/// methods the path does take.
pub const OWN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/status/history"),
];

/// Which methods each path of the admin listener takes.
#[derive(Debug, Clone)]
struct AllowTable(Arc<matchit::Router<Vec<&'static str>>>);

impl AllowTable {
    fn new(routes: impl IntoIterator<Item = (&'static str, &'static str)>) -> AllowTable {
        let mut by_path: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (method, path) in routes {
            let methods = by_path.entry(path).or_default();
            if !methods.contains(&method) {
                methods.push(method);
            }
            // axum answers HEAD wherever it answers GET.
            if method == "GET" && !methods.contains(&"HEAD") {
                methods.push("HEAD");
            }
        }
        let mut table = matchit::Router::new();
        for (path, methods) in by_path {
            // The same syntax axum's router accepted: cannot fail for a path it serves.
            if let Err(e) = table.insert(path, methods) {
                tracing::error!(path, error = %e, "Route missing from the Allow table");
            }
        }
        AllowTable(Arc::new(table))
    }

    fn allowed(&self, path: &str) -> Option<String> {
        self.0.at(path).ok().map(|m| m.value.join(", "))
    }
}

/// Gives every answer of the admin listener the documented error shape. A known path asked with
/// a method it does not take gets 405 `method_not_allowed` with `Allow` listing the methods it
/// takes (from `routes`, every `(method, path)` the listener serves: axum's own 405 carries an
/// empty `Allow` once the router has a fallback). Unknown paths already get the JSON 404 of
/// [`router`]'s fallback.
pub fn with_json_errors(
    router: Router,
    routes: impl IntoIterator<Item = (&'static str, &'static str)>,
) -> Router {
    let table = AllowTable::new(routes);
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let table = table.clone();
            method_not_allowed_as_json(table, request, next)
        },
    ))
}

async fn method_not_allowed_as_json(table: AllowTable, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = table.allowed(&path).unwrap_or_default();
    let mut json = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}; allowed: {allow}"),
    )
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&allow) {
        json.headers_mut().insert(header::ALLOW, value);
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn status_json(state: &AdminState) -> serde_json::Value {
        let response = status(State(state.clone())).await;
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The status shows the dead letters beside the outbox figures, and an `outbox` alarm while
    /// there are any.
    #[tokio::test]
    async fn status_shows_dead_letters_and_alarms_while_there_are_any() {
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (outbox, seqs, _writer) =
            crate::api::tests::outbox_with_dead_letters(dir.path(), 3, &[0, 2], stop.clone()).await;
        let board = StatusBoard::default();
        board.alarm("registry", "corrupt registry moved aside");
        board.watch_outbox(outbox.clone());
        let state = AdminState {
            gateway_id: Arc::from("gw-1"),
            outbox: outbox.clone(),
            max_bytes: 1 << 20,
            status: board,
            registry: Arc::new(Registry::default()),
            started: Instant::now(),
            history: crate::history::History::default(),
            monitoring: MonitoringAccess {
                public: false,
                tokens: Arc::default(),
            },
        };
        let (dead, dead_bytes) = outbox.dead_letter_figures();
        assert_eq!(dead, 2);
        let s = status_json(&state).await;
        assert_eq!(s["outbox"]["records"], 1, "{s}");
        assert_eq!(s["outbox"]["dead_letters"], 2, "{s}");
        assert_eq!(s["outbox"]["dead_letter_bytes"], dead_bytes, "{s}");
        let alarms = s["alarms"].as_array().unwrap();
        assert_eq!(alarms.len(), 2, "{s}");
        assert_eq!(alarms[0]["subsystem"], "registry", "raised alarms stay");
        assert_eq!(alarms[1]["subsystem"], "outbox");
        let message = alarms[1]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("2 dead letter(s) ({dead_bytes} bytes)"))
                && message.contains("outpost dead-letters list"),
            "{message}"
        );

        outbox.drop_dead_letters(Some(vec![seqs[0]])).await.unwrap();
        let s = status_json(&state).await;
        assert_eq!(s["outbox"]["dead_letters"], 1, "{s}");
        assert!(
            s["alarms"][1]["message"]
                .as_str()
                .unwrap()
                .starts_with("1 dead letter(s)")
        );

        outbox.retry_dead_letters(None).await.unwrap();
        let s = status_json(&state).await;
        assert_eq!(
            (
                &s["outbox"]["dead_letters"],
                &s["outbox"]["dead_letter_bytes"]
            ),
            (&serde_json::json!(0), &serde_json::json!(0)),
            "{s}"
        );
        assert_eq!(s["outbox"]["records"], 2, "{s}");
        let alarms = s["alarms"].as_array().unwrap();
        assert_eq!(alarms.len(), 1, "no dead letters, no alarm: {s}");
        assert_eq!(alarms[0]["subsystem"], "registry");
        stop.cancel();
    }

    /// `/metrics` and `/api/v1/status` answer loopback and the local socket without a token,
    /// another host only with a `read` token (401 naming the setting otherwise) or when
    /// `admin.public_monitoring` is on; `/healthz` answers everyone. (The end-to-end suite's
    /// listeners are loopback only, so the other host is a `ConnectInfo` here.)
    #[tokio::test]
    async fn monitoring_answers_other_hosts_only_with_a_token_unless_public() {
        use axum::extract::ConnectInfo;
        use tower::ServiceExt as _;
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (outbox, _, _writer) =
            crate::api::tests::outbox_with_dead_letters(dir.path(), 1, &[], stop.clone()).await;
        let state = |public: bool| AdminState {
            gateway_id: Arc::from("gw-1"),
            outbox: outbox.clone(),
            max_bytes: 1 << 20,
            status: StatusBoard::default(),
            registry: Arc::new(Registry::default()),
            started: Instant::now(),
            history: crate::history::History::default(),
            monitoring: MonitoringAccess {
                public,
                tokens: Arc::new(crate::api::auth::TokenSet::of(vec![
                    crate::api::auth::TokenSet::single(
                        "reader",
                        "read-token",
                        outpost_config::Scope::Read,
                    ),
                ])),
            },
        };
        let remote: std::net::SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let ask = |public: bool,
                   path: &'static str,
                   peer: Option<std::net::SocketAddr>,
                   token: Option<&'static str>| {
            let router = router(state(public));
            async move {
                let mut request = Request::builder().uri(path);
                if let Some(token) = token {
                    request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
                }
                let mut request = request.body(axum::body::Body::empty()).unwrap();
                if let Some(peer) = peer {
                    request.extensions_mut().insert(ConnectInfo(peer));
                }
                let response = router.oneshot(request).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        for path in ["/metrics", "/api/v1/status"] {
            assert_eq!(
                ask(false, path, Some(local), None).await.0,
                StatusCode::OK,
                "{path}"
            );
            assert_eq!(
                ask(false, path, Some(mapped), None).await.0,
                StatusCode::OK,
                "{path}"
            );
            let (status, body) = ask(false, path, Some(remote), None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert!(body.contains("admin.public_monitoring"), "{body}");
            let (status, _) = ask(false, path, Some(remote), Some("wrong")).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            let (status, _) = ask(false, path, Some(remote), Some("read-token")).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(
                ask(true, path, Some(remote), None).await.0,
                StatusCode::OK,
                "{path}"
            );
            // No address known (not served over TCP nor the socket): not trusted.
            assert_eq!(
                ask(false, path, None, None).await.0,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
        let (status, _) = ask(false, "/healthz", Some(remote), None).await;
        assert_eq!(status, StatusCode::OK);
        stop.cancel();
    }
}

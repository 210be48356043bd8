//! The management REST API under `/api/v1`: device inventory, monitoring, commands, apps, the
//! outbox's dead letters, and the OpenAPI document. JSON in and out; bearer tokens with scopes
//! ([`auth`]); errors name the field ([`error`]).
//!
//! Invariants:
//! - [`ROUTES`] is the one list of what this router serves: [`router`] registers exactly these
//!   entries, and the OpenAPI test checks that the document and this list agree and that every
//!   documented route answers (not 404/405).
//! - Every route except the OpenAPI document requires a token; the scope is part of each
//!   handler's signature (`Authorized<Read|Write|Admin>`) and repeated in [`ROUTES`] for the
//!   document (a test checks that they agree).
//! - Handlers never touch SQLite for reads of the inventory or monitoring (the registry serves
//!   them from memory); writes, command queries and dead-letter listings run on blocking
//!   threads (retrying and dropping dead letters goes through the outbox writer).
//! - Request bodies are limited to [`MAX_BODY`] (413 beyond).
//!
//! Wiring (`app/fronts.rs`): `admin_router.merge(api::router(api::ApiState::new(registry.clone(),
//! &config.api).with_outbox(outbox.clone())…))`. This router sets no fallback (axum refuses to
//! merge two), so the admin router's JSON 404 applies to unknown paths.

pub mod apps;
pub mod auth;
pub mod commands;
pub mod config_check;
pub mod dead_letters;
pub mod devices;
pub mod edge;
pub mod error;
pub mod openapi;
pub mod readings;
pub mod session;
pub mod tokens;
pub mod zigbee;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use outpost_config::Scope;
use serde::de::DeserializeOwned;

use self::auth::TokenSet;
use self::error::ApiError;
use crate::registry::Registry;

/// Largest accepted request body.
pub const MAX_BODY: usize = 256 * 1024;

/// What the API handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub registry: Registry,
    pub tokens: Arc<TokenSet>,
    /// The running Zigbee driver, for permit join; detached when none is configured.
    pub zigbee: outpost_drivers::zigbee::ZigbeeControl,
    /// The apps subsystem; `None` when `apps.enabled = false`.
    pub apps: Option<crate::apps::Apps>,
    /// The outbox, for its dead letters; `None` only in tests that build the API without one.
    pub outbox: Option<outpost_sync::Outbox>,
    /// Committed readings, for a device's live stream; `None` in tests without ingestion.
    pub readings: Option<tokio::sync::broadcast::Sender<crate::ingress::LocalReading>>,
    /// Cancelled at shutdown: ends the streams that would otherwise keep the listener open.
    pub stop: tokio_util::sync::CancellationToken,
    /// `--config` as the daemon was started with (`None`: the default file when it exists),
    /// for `/api/v1/config/check`.
    pub config_file: Option<std::path::PathBuf>,
    /// `[edge]`, for `/api/v1/alerts`, `/api/v1/edge/…` and the dry run; `None` in tests
    /// without it.
    pub edge: Option<crate::edge::EdgeControl>,
}

impl ApiState {
    /// The API over `registry`, accepting `tokens` (see [`TokenSet::load`]).
    pub fn new(registry: Registry, tokens: Arc<TokenSet>) -> ApiState {
        ApiState {
            registry,
            tokens,
            zigbee: outpost_drivers::zigbee::ZigbeeControl::default(),
            apps: None,
            outbox: None,
            readings: None,
            stop: tokio_util::sync::CancellationToken::new(),
            config_file: None,
            edge: None,
        }
    }

    /// Serves `/api/v1/alerts` and `/api/v1/edge/test` from `edge`.
    pub fn with_edge(mut self, edge: crate::edge::EdgeControl) -> ApiState {
        self.edge = Some(edge);
        self
    }

    /// Checks `config_file` (`--config`; `None`: the default file) for `/api/v1/config/check`.
    pub fn with_config_file(mut self, config_file: Option<std::path::PathBuf>) -> ApiState {
        self.config_file = config_file;
        self
    }

    /// Serves each device's live readings from `readings`, until `stop`.
    pub fn with_readings(
        mut self,
        readings: tokio::sync::broadcast::Sender<crate::ingress::LocalReading>,
        stop: tokio_util::sync::CancellationToken,
    ) -> ApiState {
        self.readings = Some(readings);
        self.stop = stop;
        self
    }

    /// Serves `/api/v1/dead-letters` from `outbox`.
    pub fn with_outbox(mut self, outbox: outpost_sync::Outbox) -> ApiState {
        self.outbox = Some(outbox);
        self
    }

    /// Serves `/api/v1/apps` from `apps`.
    pub fn with_apps(mut self, apps: Option<crate::apps::Apps>) -> ApiState {
        self.apps = apps;
        self
    }

    /// Serves permit join through `zigbee` (the handle the Zigbee driver attaches to).
    pub fn with_zigbee(mut self, zigbee: outpost_drivers::zigbee::ZigbeeControl) -> ApiState {
        self.zigbee = zigbee;
        self
    }
}

/// One route of this router.
#[derive(Debug)]
pub struct RouteSpec {
    pub method: &'static str,
    /// axum path syntax, which is also the OpenAPI template syntax here.
    pub path: &'static str,
    /// The scope it requires; `None` for public routes.
    pub scope: Option<Scope>,
    handler: fn() -> MethodRouter<ApiState>,
}

const fn route(
    method: &'static str,
    path: &'static str,
    scope: Option<Scope>,
    handler: fn() -> MethodRouter<ApiState>,
) -> RouteSpec {
    RouteSpec {
        method,
        path,
        scope,
        handler,
    }
}

const READ: Option<Scope> = Some(Scope::Read);
const WRITE: Option<Scope> = Some(Scope::Write);
const ADMIN: Option<Scope> = Some(Scope::Admin);

/// Every route this router serves.
pub static ROUTES: &[RouteSpec] = &[
    route("GET", "/api/v1/devices", READ, || get(devices::list)),
    route("POST", "/api/v1/devices", WRITE, || post(devices::create)),
    route("GET", "/api/v1/devices/{id}", READ, || get(devices::show)),
    route("PATCH", "/api/v1/devices/{id}", WRITE, || {
        patch(devices::update)
    }),
    route("DELETE", "/api/v1/devices/{id}", ADMIN, || {
        delete(devices::remove)
    }),
    route("POST", "/api/v1/devices/{id}/disable", WRITE, || {
        post(devices::disable)
    }),
    route("POST", "/api/v1/devices/{id}/enable", WRITE, || {
        post(devices::enable)
    }),
    route("POST", "/api/v1/devices/{id}/rotate-secret", ADMIN, || {
        post(devices::rotate_secret)
    }),
    route("GET", "/api/v1/devices/{id}/status", READ, || {
        get(devices::status)
    }),
    route("POST", "/api/v1/devices/{id}/commands", WRITE, || {
        post(commands::create)
    }),
    route("GET", "/api/v1/devices/{id}/commands", READ, || {
        get(commands::list)
    }),
    route("GET", "/api/v1/devices/{id}/commands/{cid}", READ, || {
        get(commands::show)
    }),
    route("GET", "/api/v1/devices/{id}/readings", READ, || {
        get(readings::stream)
    }),
    route("GET", "/api/v1/config/check", ADMIN, || {
        get(config_check::check)
    }),
    route("POST", "/api/v1/session", None, || post(session::create)),
    route("GET", "/api/v1/session", READ, || get(session::show)),
    route("DELETE", "/api/v1/session", READ, || {
        delete(session::delete)
    }),
    route("POST", "/api/v1/zigbee/permit-join", WRITE, || {
        post(zigbee::permit_join)
    }),
    route("GET", "/api/v1/apps", READ, || get(apps::list)),
    route("POST", "/api/v1/apps", WRITE, || post(apps::create)),
    route("GET", "/api/v1/apps/{name}", READ, || get(apps::show)),
    route("PUT", "/api/v1/apps/{name}", WRITE, || put(apps::replace)),
    route("DELETE", "/api/v1/apps/{name}", WRITE, || {
        delete(apps::remove)
    }),
    route("POST", "/api/v1/apps/{name}/restart", WRITE, || {
        post(apps::restart)
    }),
    route("GET", "/api/v1/apps/{name}/logs", READ, || get(apps::logs)),
    route("GET", "/api/v1/apps/{name}/events", READ, || {
        get(apps::events)
    }),
    route("GET", "/api/v1/dead-letters", READ, || {
        get(dead_letters::list)
    }),
    route("POST", "/api/v1/dead-letters/retry", WRITE, || {
        post(dead_letters::retry)
    }),
    route("POST", "/api/v1/dead-letters/drop", ADMIN, || {
        post(dead_letters::drop)
    }),
    route("GET", "/api/v1/alerts", READ, || get(edge::alerts)),
    route("POST", "/api/v1/edge/test", READ, || post(edge::test)),
    route("GET", "/api/v1/edge/rules", READ, || get(edge::list_rules)),
    route("PUT", "/api/v1/edge/rules/{name}", ADMIN, || {
        put(edge::put_rule)
    }),
    route("DELETE", "/api/v1/edge/rules/{name}", ADMIN, || {
        delete(edge::delete_rule)
    }),
    route("GET", "/api/v1/tokens", ADMIN, || get(tokens::list)),
    route("POST", "/api/v1/tokens", ADMIN, || post(tokens::create)),
    route("DELETE", "/api/v1/tokens/{name}", ADMIN, || {
        delete(tokens::revoke)
    }),
    route("GET", "/api/v1/openapi.json", None, || get(openapi::serve)),
];

/// The management API router, with its state applied; merge it into the admin router.
pub fn router(state: ApiState) -> Router {
    let mut router: Router<ApiState> = Router::new();
    for spec in ROUTES {
        router = router.route(spec.path, (spec.handler)());
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Path parameters of a device route: `id`, and `cid` for a command.
#[derive(Debug)]
pub struct DevicePath {
    pub id: String,
    pub cid: Option<String>,
}

impl FromRequestParts<ApiState> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let id = params
            .remove("id")
            .ok_or_else(|| ApiError::bad_request("missing device id"))?;
        Ok(DevicePath {
            id,
            cid: params.remove("cid"),
        })
    }
}

/// A JSON request body, deserialized with field-naming errors (see [`error::parse_json`]).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request bodies are limited to {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        error::parse_json(&bytes).map(JsonBody)
    }
}

#[cfg(test)]
pub(crate) mod tests;

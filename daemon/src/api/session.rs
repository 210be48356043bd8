//! Web console sessions: `POST /api/v1/session` trades an API token for a session cookie, so the
//! console (`crate::console`) never keeps a token in the browser.
//!
//! * The cookie `outpost_session` holds a random 256-bit id; it is `HttpOnly` (no script reads
//!   it), `SameSite=Strict` (no other site's page sends it) and `Secure` over HTTPS.
//! * CSRF: every request authenticated by the cookie with a method other than GET and HEAD must
//!   carry `X-CSRF-Token` with the session's CSRF token, which only the console's own origin can
//!   read (from the login answer or `GET /api/v1/session`). SameSite alone would do in current
//!   browsers; the header is the defence for the others.
//! * A session grants what its token grants *now*: a token revoked or removed from the config
//!   ends its sessions at their next request; a session idle for [`IDLE`] ends too.
//! * At most [`MAX_SESSIONS`] live at once; a new one beyond that ends the least recently used.
//!
//! A request with an `Authorization` header is judged by that header alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_config::Scope;
use serde::Deserialize;
use serde_json::json;

use super::auth::{Authorized, Read, TokenSet, require_scope, scope_name, unauthorized};
use super::error::ApiError;
use super::{ApiState, JsonBody};
use crate::registry::secrets;

/// The session cookie's name.
pub const COOKIE: &str = "outpost_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 256;

/// The open sessions, in memory: a restart signs everyone out.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

#[derive(Debug, Clone)]
struct Session {
    token: Arc<str>,
    csrf: String,
    last_used: Instant,
}

/// A session id presented in a cookie (not yet checked).
#[derive(Debug)]
pub struct Presented(String);

impl Sessions {
    /// The session id in the request's `Cookie` header, if any.
    pub fn presented(&self, headers: &HeaderMap) -> Option<Presented> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name == COOKIE && !value.is_empty()).then(|| Presented(value.to_owned()))
            })
    }

    /// Opens a session for `token`; its (id, CSRF token).
    fn open(&self, token: Arc<str>) -> (String, String) {
        let (id, csrf) = (secrets::generate(), secrets::generate());
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        open.retain(|_, s| now.duration_since(s.last_used) < IDLE);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
        {
            open.remove(&oldest);
        }
        open.insert(
            id.clone(),
            Session {
                token,
                csrf: csrf.clone(),
                last_used: now,
            },
        );
        (id, csrf)
    }

    fn close(&self, id: &Presented) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id.0);
    }

    /// The live session `id` (its use refreshes it), or `None`.
    fn live(&self, id: &Presented) -> Option<Session> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let session = open.get_mut(&id.0)?;
        if now.duration_since(session.last_used) >= IDLE {
            open.remove(&id.0);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    /// Whether session `id` may do `method` with scope `required`: 401 when it is unknown,
    /// expired or its token is gone, 403 without the CSRF header on a state-changing method or
    /// without the scope. The token's name on success.
    pub fn authorize(
        &self,
        tokens: &TokenSet,
        id: &Presented,
        method: &Method,
        headers: &HeaderMap,
        required: Scope,
    ) -> Result<Arc<str>, ApiError> {
        let Some(session) = self.live(id) else {
            return Err(unauthorized("the session has ended: sign in again", true));
        };
        let Some(scope) = tokens.scope_of(&session.token) else {
            self.close(id);
            return Err(unauthorized(
                "the session's token was revoked: sign in again",
                true,
            ));
        };
        if method != Method::GET && method != Method::HEAD {
            let presented = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            let matches = presented.is_some_and(|p| {
                secrets::digest_eq(
                    &secrets::sha256(p.as_bytes()),
                    &secrets::sha256(session.csrf.as_bytes()),
                )
            });
            if !matches {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "csrf",
                    "a request signed in by the session cookie needs the X-CSRF-Token header \
                     (GET /api/v1/session gives it)",
                ));
            }
        }
        require_scope(&session.token, scope, required)?;
        Ok(session.token)
    }
}

/// `POST /api/v1/session` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub token: String,
}

/// Whether the request came over HTTPS (the HTTPS listener marks it).
fn over_tls(parts: &axum::http::Extensions) -> bool {
    parts.get::<crate::https::OverTls>().is_some()
}

fn cookie(id: &str, tls: bool, max_age: Option<u64>) -> HeaderValue {
    let mut value = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict");
    if tls {
        value.push_str("; Secure");
    }
    if let Some(age) = max_age {
        value.push_str(&format!("; Max-Age={age}"));
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `POST /api/v1/session` `{"token": "…"}`: 201 with `{name, scope, csrf}` and the cookie;
/// 401 for a token the API does not accept.
pub async fn create(
    State(s): State<ApiState>,
    extensions: axum::http::Extensions,
    JsonBody(login): JsonBody<Login>,
) -> Result<Response, ApiError> {
    let Some((name, scope)) = s.tokens.find(login.token.trim()) else {
        tracing::info!("Console sign-in with an unknown token refused");
        return Err(unauthorized("invalid token", true));
    };
    let (id, csrf) = s.tokens.sessions.open(Arc::clone(&name));
    tracing::info!(token = %name, "Console session opened");
    let mut response = (
        StatusCode::CREATED,
        axum::Json(json!({ "name": &*name, "scope": scope_name(scope), "csrf": csrf })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(&id, over_tls(&extensions), None));
    Ok(response)
}

/// `GET /api/v1/session`: who is signed in, with the session's CSRF token (`null` when the
/// request was authenticated otherwise: a bearer token or the local socket).
pub async fn show(
    auth: Authorized<Read>,
    State(s): State<ApiState>,
    headers: HeaderMap,
) -> axum::Json<serde_json::Value> {
    let csrf = if headers.contains_key(header::AUTHORIZATION) {
        None
    } else {
        s.tokens
            .sessions
            .presented(&headers)
            .and_then(|id| s.tokens.sessions.live(&id).map(|session| session.csrf))
    };
    let scope = s.tokens.scope_of(&auth.token).unwrap_or(Scope::Admin);
    axum::Json(json!({ "name": &*auth.token, "scope": scope_name(scope), "csrf": csrf }))
}

/// `DELETE /api/v1/session`: signs out (the cookie is cleared).
pub async fn delete(
    _auth: Authorized<Read>,
    State(s): State<ApiState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
) -> Response {
    if let Some(id) = s.tokens.sessions.presented(&headers) {
        s.tokens.sessions.close(&id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        cookie("", over_tls(&extensions), Some(0)),
    );
    response
}

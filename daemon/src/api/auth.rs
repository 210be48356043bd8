//! Bearer-token authentication and scopes of the management API.
//!
//! Tokens are declared in the config as `[[api.tokens]]`, or created through the API
//! (`api::tokens`, kept in `registry.db`), both as the SHA-256 of the token (never the token):
//! the presented token is hashed and compared with *every* configured digest in
//! constant time, so neither the match nor its position leaks through timing. Scopes are ordered:
//! `admin` implies `write` implies `read`.
//!
//! - no `Authorization: Bearer …` header, or an unknown token → 401 with `WWW-Authenticate: Bearer`;
//! - a known token without the route's scope → 403.
//!
//! Handlers state their scope in their signature with [`Authorized<Read>`], [`Authorized<Write>`]
//! or [`Authorized<Admin>`] as their first extractor, so authentication runs before anything
//! reads the request.
//!
//! A request over the local admin socket (`crate::local_admin`) carries its peer's credentials
//! as `ConnectInfo<LocalPeer>`, which only that listener inserts (a client cannot forge an
//! extension): it has the `admin` scope without a token, named `local:uid=<uid>`. One whose
//! credentials could not be read is refused with 403.

use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use outpost_config::{ApiConfig, Scope};

use super::ApiState;
use super::error::ApiError;
use crate::local_admin::LocalPeer;
use crate::registry::secrets::{self, Sha256Digest};
use crate::registry::tokens::StoredToken;

/// One token the API accepts.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: Arc<str>,
    digest: Sha256Digest,
    /// The highest scope granted.
    scope: Scope,
    /// For a token created through the API: when, and by whom. `None`: from the config.
    created: Option<(i64, Arc<str>)>,
}

/// The tokens the API accepts: the config's `[[api.tokens]]` (replaced when the config is
/// reloaded) and those created through the API (`registry::tokens`), which come and go.
#[derive(Debug, Default)]
pub struct TokenSet {
    configured: RwLock<Vec<Token>>,
    created: RwLock<Vec<Token>>,
    /// Web console sessions opened with one of these tokens (`api::session`).
    pub sessions: super::session::Sessions,
}

impl TokenSet {
    pub fn from_config(config: &ApiConfig) -> TokenSet {
        TokenSet {
            configured: RwLock::new(configured_tokens(config)),
            created: RwLock::default(),
            sessions: super::session::Sessions::default(),
        }
    }

    /// The config's tokens and those the registry keeps; warns when there are none.
    pub fn load(config: &ApiConfig, registry: &crate::registry::Registry) -> TokenSet {
        let tokens = TokenSet::from_config(config);
        match registry.api_tokens() {
            Ok(stored) => tokens.load_created(stored),
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the API tokens created through the API");
            }
        }
        if tokens.is_empty() {
            tracing::warn!(
                "No API tokens: the management API answers 401 over TCP (create one on the \
                 gateway with `sudo outpost token create`, or `outpost token new` for the config)"
            );
        }
        tokens
    }

    /// Replaces the config's tokens (a reload); those created through the API stay.
    pub fn replace_configured(&self, config: &ApiConfig) {
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) = configured_tokens(config);
    }

    /// Adds the tokens created through the API (read from the registry at start).
    pub fn load_created(&self, stored: Vec<StoredToken>) {
        for t in stored {
            match Self::from_stored(&t) {
                Some(token) => self.add(token),
                None => {
                    tracing::error!(token = %t.name, "Ignoring a stored API token without a valid sha256 or scopes")
                }
            }
        }
    }

    /// A stored token as the API checks it.
    pub fn from_stored(t: &StoredToken) -> Option<Token> {
        let digest = secrets::parse_sha256_hex(&t.sha256)?;
        let scope = t.scopes.iter().filter_map(|s| parse_scope(s)).max()?;
        Some(Token {
            name: Arc::from(t.name.as_str()),
            digest,
            scope,
            created: Some((t.created_at_ms, Arc::from(t.created_by.as_str()))),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.configured().is_empty() && self.created().is_empty()
    }

    /// Whether a token of this name exists, and whether it is the config's.
    pub fn lookup(&self, name: &str) -> Option<bool> {
        if self.configured().iter().any(|t| &*t.name == name) {
            return Some(true);
        }
        self.created()
            .iter()
            .any(|t| &*t.name == name)
            .then_some(false)
    }

    pub fn add(&self, token: Token) {
        let mut created = self.created.write().unwrap_or_else(|e| e.into_inner());
        created.retain(|t| t.name != token.name);
        created.push(token);
    }

    /// Forgets a token created through the API; false if there was none.
    pub fn remove(&self, name: &str) -> bool {
        let mut created = self.created.write().unwrap_or_else(|e| e.into_inner());
        let before = created.len();
        created.retain(|t| &*t.name != name);
        created.len() != before
    }

    /// Every token, config ones first, as `GET /api/v1/tokens` lists them (never a digest).
    pub fn listing(&self) -> Vec<serde_json::Value> {
        let (configured, created) = (self.configured(), self.created());
        configured
            .iter()
            .chain(created.iter())
            .map(|t| {
                let mut v = serde_json::json!({
                    "name": &*t.name,
                    "scope": scope_name(t.scope),
                    "source": if t.created.is_some() { "api" } else { "config" },
                });
                if let Some((at, by)) = &t.created {
                    v["created_at_ms"] = serde_json::json!(at);
                    v["created_by"] = serde_json::json!(&**by);
                }
                v
            })
            .collect()
    }

    fn configured(&self) -> std::sync::RwLockReadGuard<'_, Vec<Token>> {
        self.configured.read().unwrap_or_else(|e| e.into_inner())
    }

    fn created(&self) -> std::sync::RwLockReadGuard<'_, Vec<Token>> {
        self.created.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A set with one token, for tests.
    #[cfg(test)]
    pub fn single(name: &str, token: &str, scope: Scope) -> Token {
        Token {
            name: Arc::from(name),
            digest: secrets::sha256(token.as_bytes()),
            scope,
            created: None,
        }
    }

    #[cfg(test)]
    pub fn of(tokens: Vec<Token>) -> TokenSet {
        TokenSet {
            configured: RwLock::new(tokens),
            created: RwLock::default(),
            sessions: super::session::Sessions::default(),
        }
    }

    /// The highest scope of the token named `name`, if it (still) exists.
    pub fn scope_of(&self, name: &str) -> Option<Scope> {
        let (configured, created) = (self.configured(), self.created());
        configured
            .iter()
            .chain(created.iter())
            .find(|t| &*t.name == name)
            .map(|t| t.scope)
    }

    /// The name and scope of the token matching `presented`, if any. Compares with every token
    /// in constant time.
    pub fn find(&self, presented: &str) -> Option<(Arc<str>, Scope)> {
        let digest = secrets::sha256(presented.as_bytes());
        let (configured, created) = (self.configured(), self.created());
        let mut found = None;
        for t in configured.iter().chain(created.iter()) {
            if secrets::digest_eq(&t.digest, &digest) && found.is_none() {
                found = Some((Arc::clone(&t.name), t.scope));
            }
        }
        found
    }

    /// Checks a request for `required`: its `Authorization: Bearer` token, else its web console
    /// session cookie (with the CSRF header on any method but GET and HEAD; see
    /// `api::session`).
    pub fn check_request(
        &self,
        method: &axum::http::Method,
        headers: &HeaderMap,
        required: Scope,
    ) -> Result<Arc<str>, ApiError> {
        if !headers.contains_key(header::AUTHORIZATION)
            && let Some(session) = self.sessions.presented(headers)
        {
            return self
                .sessions
                .authorize(self, &session, method, headers, required);
        }
        self.check(headers, required)
    }

    /// Checks the `Authorization` header for `required`.
    pub fn check(&self, headers: &HeaderMap, required: Scope) -> Result<Arc<str>, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("missing bearer token", false));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty());
        let Some(presented) = presented else {
            return Err(unauthorized(
                "the Authorization header must be `Bearer <token>`",
                false,
            ));
        };
        let Some((name, scope)) = self.find(presented) else {
            tracing::debug!("Management API request with an unknown token");
            return Err(unauthorized("invalid token", true));
        };
        require_scope(&name, scope, required)?;
        Ok(name)
    }
}

/// 403 unless `scope` covers `required`.
pub fn require_scope(name: &str, scope: Scope, required: Scope) -> Result<(), ApiError> {
    {
        if scope < required {
            return Err(ApiError {
                challenge: Some(match required {
                    Scope::Admin => {
                        "Bearer realm=\"outpost\", error=\"insufficient_scope\", scope=\"admin\""
                    }
                    _ => "Bearer realm=\"outpost\", error=\"insufficient_scope\", scope=\"write\"",
                }),
                ..ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "token \"{name}\" lacks the \"{}\" scope",
                        scope_name(required)
                    ),
                )
            });
        }
        Ok(())
    }
}

pub fn unauthorized(message: &str, invalid: bool) -> ApiError {
    ApiError {
        challenge: Some(if invalid {
            "Bearer realm=\"outpost\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"outpost\""
        }),
        ..ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

/// The config's `[[api.tokens]]` as the API checks them.
fn configured_tokens(config: &ApiConfig) -> Vec<Token> {
    let mut tokens = Vec::new();
    for t in &config.tokens {
        let (Some(digest), Some(scope)) = (
            secrets::parse_sha256_hex(&t.sha256),
            t.scopes.iter().copied().max(),
        ) else {
            // The config validation rejects these; never grant anything for them.
            tracing::error!(token = %t.name, "Ignoring an API token without a valid sha256 or scopes");
            continue;
        };
        tokens.push(Token {
            name: Arc::from(t.name.as_str()),
            digest,
            scope,
            created: None,
        });
    }
    tokens
}

/// `read`, `write` or `admin`.
pub fn parse_scope(name: &str) -> Option<Scope> {
    match name {
        "read" => Some(Scope::Read),
        "write" => Some(Scope::Write),
        "admin" => Some(Scope::Admin),
        _ => None,
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
        Scope::Admin => "admin",
    }
}

/// A scope a route requires, as a type.
pub trait RequiredScope: Send + Sync + 'static {
    const SCOPE: Scope;
}

#[derive(Debug)]
pub struct Read;
#[derive(Debug)]
pub struct Write;
#[derive(Debug)]
pub struct Admin;

impl RequiredScope for Read {
    const SCOPE: Scope = Scope::Read;
}
impl RequiredScope for Write {
    const SCOPE: Scope = Scope::Write;
}
impl RequiredScope for Admin {
    const SCOPE: Scope = Scope::Admin;
}

/// Extractor: the request carries a token with scope `S`; holds the token's name.
#[derive(Debug)]
pub struct Authorized<S> {
    pub token: Arc<str>,
    _scope: PhantomData<S>,
}

impl<S: RequiredScope> FromRequestParts<ApiState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<LocalPeer>>() {
            let Some(uid) = peer.uid else {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "the local admin socket could not read this connection's credentials",
                ));
            };
            return Ok(Authorized {
                token: Arc::from(format!("local:uid={uid}")),
                _scope: PhantomData,
            });
        }
        let token = state
            .tokens
            .check_request(&parts.method, &parts.headers, S::SCOPE)?;
        Ok(Authorized {
            token,
            _scope: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn scopes_are_ordered_and_checked() {
        let set = TokenSet::of(vec![
            TokenSet::single("reader", "r-token", Scope::Read),
            TokenSet::single("writer", "w-token", Scope::Write),
            TokenSet::single("root", "a-token", Scope::Admin),
        ]);
        let status = |auth: Option<&str>, scope| {
            set.check(&headers(auth), scope)
                .map(|name| name.to_string())
                .map_err(|e| e.status.as_u16())
        };
        assert_eq!(status(None, Scope::Read), Err(401));
        assert_eq!(status(Some("Basic abc"), Scope::Read), Err(401));
        assert_eq!(status(Some("Bearer "), Scope::Read), Err(401));
        assert_eq!(status(Some("Bearer nope"), Scope::Read), Err(401));
        assert_eq!(
            status(Some("Bearer r-token"), Scope::Read),
            Ok("reader".into())
        );
        assert_eq!(
            status(Some("bearer r-token"), Scope::Read),
            Ok("reader".into())
        );
        assert_eq!(status(Some("Bearer r-token"), Scope::Write), Err(403));
        assert_eq!(
            status(Some("Bearer w-token"), Scope::Write),
            Ok("writer".into())
        );
        assert_eq!(status(Some("Bearer w-token"), Scope::Admin), Err(403));
        assert_eq!(
            status(Some("Bearer a-token"), Scope::Read),
            Ok("root".into())
        );
        assert_eq!(
            status(Some("Bearer a-token"), Scope::Admin),
            Ok("root".into())
        );
    }

    #[test]
    fn from_config_uses_the_highest_scope_and_skips_bad_entries() {
        let token =
            |name: &str, sha256: String, scopes: Vec<Scope>| outpost_config::ApiTokenConfig {
                name: name.into(),
                sha256,
                scopes,
            };
        let config = ApiConfig {
            tokens: vec![
                token(
                    "a",
                    secrets::hex(&secrets::sha256(b"tok")),
                    vec![Scope::Read, Scope::Admin],
                ),
                token("b", "xyz".into(), vec![Scope::Admin]),
            ],
        };
        let set = TokenSet::from_config(&config);
        assert_eq!(set.configured().len(), 1);
        assert!(
            set.check(&headers(Some("Bearer tok")), Scope::Admin)
                .is_ok()
        );
    }
}

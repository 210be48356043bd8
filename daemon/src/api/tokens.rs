//! Management API tokens through the API: `GET /api/v1/tokens`, `POST /api/v1/tokens`,
//! `DELETE /api/v1/tokens/{name}` (all `admin`; the CLI's `outpost token list|create|revoke`).
//!
//! A created token is 32 random bytes (64 hex digits), returned once in the `201` answer and
//! stored as its SHA-256 in `registry.db` (`registry::tokens`), like the config's
//! `[[api.tokens]]`; it works from the next request on and survives restarts. Revoking deletes
//! it at once. The config's tokens are listed (`"source": "config"`) but cannot be revoked here
//! (409: the config file is the operator's, the daemon never writes it); names are unique
//! across both.
//!
//! Statuses: 200, 201, 204; 422 naming `name` or `scopes`; 409 `already_exists` or
//! `config_token`; 404 for no such token.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Admin, Authorized, TokenSet, parse_scope};
use super::error::ApiError;
use super::{ApiState, JsonBody};
use crate::registry::secrets;
use crate::registry::tokens::StoredToken;

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub scopes: Vec<String>,
}

/// `GET /api/v1/tokens`: every token's name, highest scope and source; never a digest.
pub async fn list(_: Authorized<Admin>, State(s): State<ApiState>) -> axum::Json<Value> {
    axum::Json(json!({ "tokens": s.tokens.listing() }))
}

/// `POST /api/v1/tokens`: a new token, shown once.
pub async fn create(
    auth: Authorized<Admin>,
    State(s): State<ApiState>,
    JsonBody(new): JsonBody<NewToken>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let name_ok = (1..=64).contains(&new.name.len())
        && new
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !name_ok {
        return Err(ApiError::invalid(
            "name",
            "use 1 to 64 characters a-z, 0-9, _ or -",
        ));
    }
    let mut scopes: Vec<String> = Vec::new();
    for (i, scope) in new.scopes.iter().enumerate() {
        if parse_scope(scope).is_none() {
            return Err(ApiError::invalid(
                format!("scopes[{i}]"),
                format!("unknown scope \"{scope}\": use read, write or admin"),
            ));
        }
        if !scopes.contains(scope) {
            scopes.push(scope.clone());
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::invalid(
            "scopes",
            "at least one of read, write, admin",
        ));
    }
    if s.tokens.lookup(&new.name).is_some() {
        return Err(exists(&new.name));
    }
    let token = secrets::generate();
    let stored = StoredToken {
        name: new.name.clone(),
        sha256: secrets::hex(&secrets::sha256(token.as_bytes())),
        scopes: scopes.clone(),
        created_at_ms: outpost_sync::outbox::now_unix_ms(),
        created_by: auth.token.to_string(),
    };
    let accepted = TokenSet::from_stored(&stored)
        .ok_or_else(|| ApiError::invalid("scopes", "at least one of read, write, admin"))?;
    if !s.registry.add_api_token(stored.clone()).await? {
        return Err(exists(&new.name));
    }
    s.tokens.add(accepted);
    tracing::info!(name = %new.name, scopes = %scopes.join(","), token = %auth.token, "API token created through the API");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "name": stored.name,
            "scopes": scopes,
            "token": token,
            "source": "api",
            "created_at_ms": stored.created_at_ms,
            "created_by": stored.created_by,
        })),
    ))
}

/// `DELETE /api/v1/tokens/{name}`: revokes a token created through the API.
pub async fn revoke(
    auth: Authorized<Admin>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    match s.tokens.lookup(&name) {
        None => return Err(ApiError::not_found(format!("no API token \"{name}\""))),
        Some(true) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "config_token",
                format!(
                    "token \"{name}\" is declared in the configuration file ([[api.tokens]]): \
                     remove it there and restart the daemon"
                ),
            ));
        }
        Some(false) => {}
    }
    // Forget it first: from here on it grants nothing, even if the delete below fails.
    s.tokens.remove(&name);
    s.registry.remove_api_token(name.clone()).await?;
    tracing::info!(name = %name, token = %auth.token, "API token revoked through the API");
    Ok(StatusCode::NO_CONTENT)
}

fn exists(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "already_exists",
        format!("an API token named \"{name}\" exists"),
    )
    .field("name")
}

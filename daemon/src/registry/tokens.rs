//! Management API tokens created through the API (`POST /api/v1/tokens`, `outpost token
//! create`), stored in `registry.db` as the SHA-256 of the token, like the config's
//! `[[api.tokens]]` (tokens are 32 random bytes, so the digest can be neither reversed nor
//! guessed). The config's tokens are never written here; names are unique across both.

use rusqlite::{Connection, OptionalExtension, params};

/// A stored token, without the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// A subset of `read`, `write`, `admin`.
    pub scopes: Vec<String>,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// Every stored token, by name.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<StoredToken>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, sha256, scopes, created_at_ms, created_by FROM api_tokens ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        let scopes: String = r.get(2)?;
        Ok(StoredToken {
            name: r.get(0)?,
            sha256: r.get(1)?,
            scopes: scopes.split(',').map(str::to_owned).collect(),
            created_at_ms: r.get(3)?,
            created_by: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Stores `token`; false if a token of that name exists.
pub fn insert(conn: &Connection, token: &StoredToken) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "INSERT INTO api_tokens (name, sha256, scopes, created_at_ms, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
        params![
            token.name,
            token.sha256,
            token.scopes.join(","),
            token.created_at_ms,
            token.created_by
        ],
    )?;
    Ok(n == 1)
}

/// Deletes the token `name`; the deleted token, if there was one.
pub fn delete(conn: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "DELETE FROM api_tokens WHERE name = ?1 RETURNING name",
        [name],
        |r| r.get(0),
    )
    .optional()
}

//! `GET /api/v1/config/check` (scope `admin`): what `outpost check-config` would say about the
//! configuration file the daemon runs from, read now — so an operator sees, before
//! `systemctl reload outpost`, whether the edited file loads. The file is read, never changed;
//! its content is not returned (it may hold secrets), only its problems and warnings, each with
//! its key path. What the last reload applied is in `/api/v1/status` (`config`).

use axum::extract::State;
use serde_json::{Value, json};

use super::ApiState;
use super::auth::{Admin, Authorized};

/// `GET /api/v1/config/check` → 200 `{file, ok, problems: [{path, message}], warnings, error}`.
pub async fn check(_: Authorized<Admin>, State(s): State<ApiState>) -> axum::Json<Value> {
    let named = s.config_file.clone();
    let result = tokio::task::spawn_blocking(move || {
        let file = crate::cli::config_file(named.as_deref());
        let shown = file.as_ref().map(|f| f.display().to_string());
        let problem = |p: &outpost_config::Problem| json!({ "path": p.path, "message": p.message });
        match crate::cli::load_config(file.as_deref()) {
            Ok(config) => json!({
                "file": shown,
                "ok": true,
                "problems": [],
                "warnings": config.warnings().iter().map(problem).collect::<Vec<_>>(),
                "error": null,
            }),
            Err(e) => json!({
                "file": shown,
                "ok": false,
                "problems": e.problems().iter().map(problem).collect::<Vec<_>>(),
                "warnings": [],
                "error": e.to_string(),
            }),
        }
    })
    .await
    .unwrap_or_else(|e| json!({ "ok": false, "error": format!("the check failed: {e}") }));
    axum::Json(result)
}

//! Local app containers: `GET/POST /api/v1/apps`, `GET/PUT/DELETE /api/v1/apps/{name}`,
//! `POST /api/v1/apps/{name}/restart`, `GET /api/v1/apps/{name}/logs?tail=N&follow=true`,
//! `GET /api/v1/apps/{name}/events` (recorded status changes).
//!
//! Changes need the write scope. Apps declared in the configuration file are listed but cannot
//! be changed or deleted here (409 `declared_in_config`). With `apps.enabled = false` every
//! route answers 409 `apps_disabled`. Changes take effect through the reconcile loop: a 201/200
//! means "desired", the app's `status` shows when it runs.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use outpost_config::AppConfig;
use serde::{Deserialize, Serialize};

use super::auth::{Authorized, Read, Write};
use super::error::ApiError;
use super::{ApiState, JsonBody};
use crate::apps::engine::{Engine, container_name};
use crate::apps::{AppStatus, Apps, AppsError, Source};

/// An app as the API shows it.
#[derive(Debug, Serialize)]
pub struct AppView {
    pub name: String,
    pub source: Source,
    pub spec: AppConfig,
    pub status: AppStatus,
}

fn apps(s: &ApiState) -> Result<&Apps, ApiError> {
    s.apps.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "apps_disabled",
            "the apps subsystem is disabled (apps.enabled = false)",
        )
    })
}

fn view(apps: &Apps, name: &str) -> Result<AppView, ApiError> {
    let (desired, status) = apps
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no app \"{name}\"")))?;
    Ok(AppView {
        name: name.to_owned(),
        source: desired.source,
        spec: desired.spec,
        status,
    })
}

impl From<AppsError> for ApiError {
    fn from(e: AppsError) -> ApiError {
        match &e {
            AppsError::NotFound(_) => ApiError::not_found(e.to_string()),
            AppsError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            AppsError::FromConfig(_) => {
                ApiError::new(StatusCode::CONFLICT, "declared_in_config", e.to_string())
            }
            AppsError::Invalid(problems) => {
                let field = problems.first().map(|(k, _)| k.clone()).unwrap_or_default();
                ApiError::invalid(field, e.to_string())
            }
            AppsError::Store(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// `GET /api/v1/apps`
pub async fn list(_: Authorized<Read>, State(s): State<ApiState>) -> Result<Response, ApiError> {
    let apps = apps(&s)?;
    let items: Vec<AppView> = apps
        .list()
        .into_iter()
        .map(|(d, status)| AppView {
            name: d.spec.name.clone(),
            source: d.source,
            spec: d.spec,
            status,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "engine_problem": apps.engine_problem(),
        "items": items,
    }))
    .into_response())
}

/// `POST /api/v1/apps`
pub async fn create(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    JsonBody(spec): JsonBody<AppConfig>,
) -> Result<Response, ApiError> {
    let apps = apps(&s)?;
    let name = spec.name.clone();
    apps.create(spec).await?;
    Ok((StatusCode::CREATED, axum::Json(view(apps, &name)?)).into_response())
}

/// `GET /api/v1/apps/{name}`
pub async fn show(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(view(apps(&s)?, &name)?).into_response())
}

/// `PUT /api/v1/apps/{name}`: the whole spec; its `name` must match the path (or be empty).
pub async fn replace(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    JsonBody(mut spec): JsonBody<AppConfig>,
) -> Result<Response, ApiError> {
    let apps = apps(&s)?;
    if spec.name.is_empty() {
        spec.name.clone_from(&name);
    } else if spec.name != name {
        return Err(ApiError::invalid(
            "name",
            format!("the body names \"{}\", the path \"{name}\"", spec.name),
        ));
    }
    apps.replace(spec).await?;
    Ok(axum::Json(view(apps, &name)?).into_response())
}

/// `DELETE /api/v1/apps/{name}`
pub async fn remove(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    apps(&s)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/apps/{name}/restart`
pub async fn restart(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let apps = apps(&s)?;
    apps.restart(&name)?;
    Ok((StatusCode::ACCEPTED, axum::Json(view(apps, &name)?)).into_response())
}

/// `GET /api/v1/apps/{name}/events`: the app's recorded status changes, newest first.
pub async fn events(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let events = apps(&s)?.events(&name).await?;
    Ok(axum::Json(serde_json::json!({ "events": events })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Last N lines; all without it.
    pub tail: Option<usize>,
    /// Keep streaming new output.
    #[serde(default)]
    pub follow: bool,
}

/// `GET /api/v1/apps/{name}/logs?tail=N&follow=true`: plain text.
pub async fn logs(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let apps = apps(&s)?;
    view(apps, &name)?;
    let unavailable =
        |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable", e);
    let engine = Engine::connect(&apps.settings().engine_socket)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut stream = engine.logs(&container_name(&name), q.tail, q.follow);
    // The first item tells whether the container exists.
    let first = match stream.next().await {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        })) => {
            return Err(ApiError::not_found(format!(
                "app \"{name}\" has no container"
            )));
        }
        Some(Err(e)) => return Err(unavailable(e.to_string())),
    };
    let rest = stream.map(|item| item.map_err(std::io::Error::other));
    let body = futures_util::stream::iter(first.map(Ok)).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

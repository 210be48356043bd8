//! Router-level tests: the OpenAPI document against the registered routes, scopes, errors.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use tower::ServiceExt;

use super::auth::TokenSet;
use super::*;
use crate::registry::Registry;

const READ_TOKEN: &str = "read-token";
const WRITE_TOKEN: &str = "write-token";
const ADMIN_TOKEN: &str = "admin-token";

fn state(dir: &std::path::Path) -> ApiState {
    ApiState {
        registry: Registry::open(dir, std::time::Duration::from_secs(300)).unwrap(),
        tokens: Arc::new(TokenSet::of(vec![
            TokenSet::single("r", READ_TOKEN, Scope::Read),
            TokenSet::single("w", WRITE_TOKEN, Scope::Write),
            TokenSet::single("a", ADMIN_TOKEN, Scope::Admin),
        ])),
        zigbee: outpost_drivers::zigbee::ZigbeeControl::default(),
        apps: None,
    }
}

async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value, axum::http::HeaderMap) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

/// Fills `{id}` and `{cid}` with existing resources.
fn concrete(path: &str, cid: i64) -> String {
    path.replace("{id}", "dev-1")
        .replace("{cid}", &cid.to_string())
        .replace("{topic}", "t/1")
}

async fn fixture(router: &Router) -> i64 {
    let (s, _, _) = call(
        router,
        "POST",
        "/api/v1/devices",
        Some(WRITE_TOKEN),
        Some(r#"{"id": "dev-1"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, cmd, _) = call(
        router,
        "POST",
        "/api/v1/devices/dev-1/commands",
        Some(WRITE_TOKEN),
        Some(r#"{"payload": {"x": 1}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    cmd["id"].as_i64().unwrap()
}

#[test]
fn document_and_routes_agree() {
    let doc = openapi::document();
    let documented = openapi::operations(&doc);
    for spec in ROUTES {
        assert!(
            documented.contains(&(spec.method.to_owned(), spec.path.to_owned())),
            "{} {} is registered but not documented",
            spec.method,
            spec.path
        );
    }
    let others = [
        "/api/v1/ingest/{topic}",
        "/api/v1/device/commands",
        "/api/v1/status",
        "/healthz",
        "/readyz",
        "/metrics",
    ];
    for (method, path) in &documented {
        if others.contains(&path.as_str()) {
            continue;
        }
        assert!(
            ROUTES.iter().any(|s| s.method == method && s.path == path),
            "{method} {path} is documented but not registered"
        );
    }
    // Every operation has responses and a unique operationId; every $ref resolves.
    let mut ids = std::collections::BTreeSet::new();
    for (method, path) in &documented {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op["responses"].is_object(), "{method} {path}");
        assert!(ids.insert(op["operationId"].as_str().unwrap().to_owned()));
    }
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }
}

/// OpenAPI 3.0 (the document's version) has no type arrays; `nullable` says "or null".
#[test]
fn the_document_uses_only_openapi_3_0_types() {
    use serde_json::Value;
    fn walk(v: &Value, at: &str) {
        match v {
            Value::Object(map) => {
                if let Some(t) = map.get("type") {
                    assert!(
                        t.is_string(),
                        "{at}: \"type\" must be a string in 3.0.3: {t}"
                    );
                }
                for (k, child) in map {
                    walk(child, &format!("{at}/{k}"));
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    let doc = openapi::document();
    assert_eq!(doc["openapi"], "3.0.3");
    walk(&doc, "");
}

/// With `apps.enabled = false` every apps route answers 409 `apps_disabled`: documented on each.
#[tokio::test]
async fn every_apps_route_documents_and_answers_apps_disabled() {
    let doc = openapi::document();
    let dir = tempfile::tempdir().unwrap();
    let router = router(state(dir.path()));
    for spec in ROUTES.iter().filter(|s| s.path.starts_with("/api/v1/apps")) {
        let op = &doc["paths"][spec.path][spec.method.to_ascii_lowercase()];
        let documented = op["responses"]["409"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(
            documented.contains("apps_disabled"),
            "{} {}: 409 apps_disabled undocumented",
            spec.method,
            spec.path
        );
        let body = (matches!(spec.method, "POST" | "PUT") && !spec.path.ends_with("restart"))
            .then_some(r#"{"name":"x","image":"i"}"#);
        let path = spec.path.replace("{name}", "x");
        let (status, answer, _) = call(&router, spec.method, &path, Some(ADMIN_TOKEN), body).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "{} {path}: {answer}",
            spec.method
        );
        assert_eq!(answer["error"], "apps_disabled", "{} {path}", spec.method);
    }
}

#[tokio::test]
async fn every_documented_management_route_answers() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(state(dir.path()));
    let cid = fixture(&router).await;
    let doc = openapi::document();
    let mut ops = openapi::operations(&doc);
    // Deleting last keeps the device for the other routes.
    ops.sort_by_key(|(m, _)| m == "DELETE");
    for (method, path) in ops {
        if !ROUTES.iter().any(|s| s.method == method && s.path == path) {
            continue; // served by other routers; checked against the real binary
        }
        let (status, body, _) = call(
            &router,
            &method,
            &concrete(&path, cid),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status} {body}"
        );
    }
}

#[tokio::test]
async fn scopes_in_the_route_list_match_the_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(state(dir.path()));
    let cid = fixture(&router).await;
    for spec in ROUTES {
        let path = concrete(spec.path, cid);
        let Some(scope) = spec.scope else {
            let (status, _, _) = call(&router, spec.method, &path, None, None).await;
            assert_eq!(status, StatusCode::OK, "{} {}", spec.method, spec.path);
            continue;
        };
        let (status, body, headers) = call(&router, spec.method, &path, None, None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{} {}",
            spec.method,
            spec.path
        );
        assert_eq!(body["error"], "unauthorized");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let (status, _, _) = call(&router, spec.method, &path, Some("bogus"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let weaker = match scope {
            Scope::Read => None,
            Scope::Write => Some(READ_TOKEN),
            Scope::Admin => Some(WRITE_TOKEN),
        };
        if let Some(token) = weaker {
            let (status, body, _) = call(&router, spec.method, &path, Some(token), None).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{} {} with a weaker token",
                spec.method,
                spec.path
            );
            assert_eq!(body["error"], "forbidden");
        }
        if spec.method != "DELETE" {
            let exact = match scope {
                Scope::Read => READ_TOKEN,
                Scope::Write => WRITE_TOKEN,
                Scope::Admin => ADMIN_TOKEN,
            };
            let (status, _, _) = call(&router, spec.method, &path, Some(exact), None).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{} {} with its own scope: {status}",
                spec.method,
                spec.path
            );
        }
    }
}

#[tokio::test]
async fn bodies_are_checked_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(state(dir.path()));
    let post = |body: &'static str| {
        let router = router.clone();
        async move {
            call(
                &router,
                "POST",
                "/api/v1/devices",
                Some(WRITE_TOKEN),
                Some(body),
            )
            .await
        }
    };
    let (s, b, _) = post(r#"{"id": "a""#).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (s, b, _) = post(r#"{"id": "a", "colour": "red"}"#).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        (b["error"].as_str(), b["field"].as_str()),
        (Some("unknown_field"), Some("colour"))
    );
    let (s, b, _) = post(r#"{"id": "a", "enabled": "yes"}"#).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        (b["error"].as_str(), b["field"].as_str()),
        (Some("invalid_type"), Some("enabled"))
    );
    let (s, b, _) = post(r#"{"id": "a", "protocols": ["mqtt", "smtp"]}"#).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["field"], "protocols[1]");
    let (s, b, _) = post(r#"{"id": "a b"}"#).await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("id"))
    );
    let (s, b, _) = post(r#"{"name": "x"}"#).await;
    assert_eq!(
        (b["error"].as_str(), b["field"].as_str()),
        (Some("missing_field"), Some("id"))
    );
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    let (s, _, headers) = post(r#"{"id": "a"}"#).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(headers["location"], "/api/v1/devices/a");
    let (s, b, _) = post(r#"{"id": "a"}"#).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::CONFLICT, Some("already_exists"))
    );

    let big = format!(r#"{{"id": "b", "name": "{}"}}"#, "x".repeat(MAX_BODY));
    let (s, b, _) = call(
        &router,
        "POST",
        "/api/v1/devices",
        Some(WRITE_TOKEN),
        Some(&big),
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );

    let (s, b, _) = call(
        &router,
        "POST",
        "/api/v1/devices/a/commands",
        Some(WRITE_TOKEN),
        Some(r#"{"payload": 1, "ttl": "10 parsecs"}"#),
    )
    .await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("ttl"))
    );

    let (s, b, _) = call(
        &router,
        "GET",
        "/api/v1/devices?limit=0",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("limit"))
    );
    let (s, b, _) = call(
        &router,
        "GET",
        "/api/v1/devices?colour=red",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("colour"))
    );
    let (s, b, _) = call(
        &router,
        "GET",
        "/api/v1/devices?state=sleepy",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (s, b["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("state"))
    );
    let (s, _, _) = call(
        &router,
        "GET",
        "/api/v1/devices/nope",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = call(
        &router,
        "GET",
        "/api/v1/devices/a/commands/xyz",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn zigbee_permit_join_reaches_the_driver_queue() {
    use outpost_drivers::zigbee::{ControlError, ControlRequest, ZigbeeControl};
    let dir = tempfile::tempdir().unwrap();
    let without = router(state(dir.path()));
    let path = "/api/v1/zigbee/permit-join";
    let (s, b, _) = call(
        &without,
        "POST",
        path,
        Some(WRITE_TOKEN),
        Some(r#"{"duration":"60s"}"#),
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::CONFLICT, Some("no_zigbee_driver"))
    );

    let control = ZigbeeControl::default();
    let mut queue = control.attach();
    // A stand-in driver: grants what is asked, except 7 s which finds the stick unplugged.
    tokio::spawn(async move {
        while let Some(ControlRequest::PermitJoin { duration, reply }) = queue.recv().await {
            let answer = if duration.as_secs() == 7 {
                Err(ControlError::Unavailable("unplugged".into()))
            } else {
                Ok(duration)
            };
            let _ = reply.send(answer);
        }
    });
    let dir2 = tempfile::tempdir().unwrap();
    let with = router(state(dir2.path()).with_zigbee(control));
    for (body, status, seconds) in [
        (r#"{"duration":"60s"}"#, StatusCode::OK, Some(60)),
        (r#"{"duration":254}"#, StatusCode::OK, Some(254)),
        (r#"{"duration":"1m30s"}"#, StatusCode::OK, Some(90)),
        (r#"{"duration":7}"#, StatusCode::SERVICE_UNAVAILABLE, None),
        (r#"{"duration":0}"#, StatusCode::UNPROCESSABLE_ENTITY, None),
        (
            r#"{"duration":"255s"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            r#"{"duration":"1500ms"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            r#"{"duration":"soon"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (r#"{"seconds":5}"#, StatusCode::UNPROCESSABLE_ENTITY, None),
    ] {
        let (s, b, _) = call(&with, "POST", path, Some(WRITE_TOKEN), Some(body)).await;
        assert_eq!(s, status, "{body}: {b}");
        if let Some(n) = seconds {
            assert_eq!(b["seconds"], n, "{body}: {b}");
        }
    }
    let (s, _, _) = call(
        &with,
        "POST",
        path,
        Some(READ_TOKEN),
        Some(r#"{"duration":5}"#),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

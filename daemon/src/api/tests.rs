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
        outbox: None,
        readings: None,
        stop: tokio_util::sync::CancellationToken::new(),
        config_file: Some("/dev/null".into()),
        edge: None,
    }
}

/// A real outbox in `dir` (its writer running until `stop`) holding `n` records of device
/// `dev-1`, of which those at the indexes `dead` were moved to the dead-letter table. Returns the
/// outbox, every record's sequence, and the writer task.
pub(crate) async fn outbox_with_dead_letters(
    dir: &std::path::Path,
    n: usize,
    dead: &[usize],
    stop: tokio_util::sync::CancellationToken,
) -> (
    outpost_sync::Outbox,
    Vec<u64>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    use outpost_sync::outbox::DeadLetterCause;
    use outpost_sync::{Envelope, OutboxOptions, Source};
    let (outbox, writer) =
        outpost_sync::outbox::open(OutboxOptions::with_path(dir.join("outbox.db"))).unwrap();
    let task = tokio::spawn(async move { writer.run(stop).await.map_err(|e| e.to_string()) });
    let mut seqs = Vec::new();
    for i in 0..n {
        let envelope = Envelope {
            route: Arc::from("default"),
            device_id: "dev-1".into(),
            source: Source::Mqtt,
            topic: format!("t/{i}"),
            received_at_ms: 1_000 + i as i64,
            content_type: None,
            headers: vec![],
            payload: vec![b'x'; 10 * (i + 1)].into(),
            priority: None,
        };
        seqs.push(outbox.append(envelope).await.unwrap());
    }
    for &i in dead {
        let cause = DeadLetterCause {
            reason: "too_large",
            error: format!("Broker: Message size too large ({i})"),
            kafka_topic: "t".into(),
            attempts: 1,
        };
        assert!(outbox.dead_letter(seqs[i], cause).await.unwrap());
    }
    (outbox, seqs, task)
}

async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value, axum::http::HeaderMap) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("authorization", a))
        .into_iter()
        .collect();
    call_with(router, method, path, &headers, body).await
}

/// Fills `{id}` and `{cid}` with existing resources.
fn concrete(path: &str, cid: i64) -> String {
    path.replace("{id}", "dev-1")
        .replace("{cid}", &cid.to_string())
        .replace("{topic}", "t/1")
        // The config's admin token: revoking it answers 409, a route that exists.
        .replace("{name}", "a")
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
        "/api/v1/device/commands/{id}/ack",
        "/api/v1/status",
        "/api/v1/status/history",
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
            // Public: answered without credentials (a sign-in without its body is a 422/400).
            let (status, _, _) = call(&router, spec.method, &path, None, None).await;
            if spec.method == "GET" {
                assert_eq!(status, StatusCode::OK, "{} {}", spec.method, spec.path);
            } else {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{} {}: {status}",
                    spec.method,
                    spec.path
                );
            }
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

/// `GET /api/v1/dead-letters`: oldest first, in pages (`next_after` null on the last), with the
/// table's totals; bad query values are 400 naming the parameter.
#[tokio::test]
async fn dead_letters_are_listed_in_pages_with_the_table_totals() {
    let dir = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (outbox, seqs, _writer) =
        outbox_with_dead_letters(dir.path(), 5, &[0, 1, 3, 4], stop.clone()).await;
    let router = router(state(dir.path()).with_outbox(outbox.clone()));
    let (dead_count, dead_bytes) = outbox.dead_letter_figures();
    assert_eq!(dead_count, 4);

    let get = |query: String| {
        let router = router.clone();
        async move {
            call(
                &router,
                "GET",
                &format!("/api/v1/dead-letters{query}"),
                Some(READ_TOKEN),
                None,
            )
            .await
        }
    };
    let listed = |page: &serde_json::Value| -> Vec<u64> {
        page["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["seq"].as_u64().unwrap())
            .collect()
    };

    let (s, all, _) = get(String::new()).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    assert_eq!(listed(&all), [seqs[0], seqs[1], seqs[3], seqs[4]]);
    assert_eq!(
        (&all["total"], &all["bytes"], &all["next_after"]),
        (
            &serde_json::json!(4),
            &serde_json::json!(dead_bytes),
            &serde_json::Value::Null
        )
    );
    let first = &all["dead_letters"][0];
    assert_eq!(first["device_id"], "dev-1");
    assert_eq!(first["topic"], "t/0");
    assert_eq!(first["source"], "mqtt");
    assert_eq!(first["route"], "default");
    assert_eq!(first["received_at_ms"], 1_000);
    assert_eq!(first["content_type"], serde_json::Value::Null);
    assert_eq!(first["reason"], "too_large");
    assert_eq!(first["error"], "Broker: Message size too large (0)");
    assert_eq!(first["kafka_topic"], "t");
    assert_eq!(first["attempts"], 1);
    assert!(first["dead_at_ms"].as_i64().unwrap() > 0);
    let sizes: u64 = all["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_u64().unwrap())
        .sum();
    assert_eq!(sizes, dead_bytes, "the sizes add up to the table's bytes");

    let (s, page, _) = get("?limit=2".into()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(listed(&page), [seqs[0], seqs[1]]);
    assert_eq!(page["next_after"], seqs[1]);
    assert_eq!(
        page["total"], 4,
        "the totals are the table's, not the page's"
    );
    let (_, page, _) = get(format!("?limit=2&after={}", seqs[1])).await;
    assert_eq!(listed(&page), [seqs[3], seqs[4]]);
    assert_eq!(page["next_after"], serde_json::Value::Null, "the last page");
    let (_, page, _) = get(format!("?after={}", seqs[4])).await;
    assert_eq!(listed(&page), Vec::<u64>::new());
    assert_eq!(page["next_after"], serde_json::Value::Null);

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?after=-1", "after"),
        ("?after=x", "after"),
        ("?colour=red", "colour"),
    ] {
        let (s, b, _) = get(query.into()).await;
        assert_eq!(
            (s, b["error"].as_str(), b["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_request"), Some(field)),
            "{query}: {b}"
        );
    }
    let (s, _, _) = get("?limit=1000".into()).await;
    assert_eq!(s, StatusCode::OK);
    stop.cancel();
}

/// Retry puts dead letters back into the outbox (write scope); drop deletes them for good
/// (admin scope); unknown sequences are ignored; `all` takes every one.
#[tokio::test]
async fn dead_letters_are_retried_and_dropped_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (outbox, seqs, _writer) =
        outbox_with_dead_letters(dir.path(), 5, &[1, 2, 3, 4], stop.clone()).await;
    let router = router(state(dir.path()).with_outbox(outbox.clone()));
    assert_eq!(outbox.figures().0, 1, "one record left to forward");
    let post = |path: &'static str, token: &'static str, body: String| {
        let router = router.clone();
        async move { call(&router, "POST", path, Some(token), Some(&body)).await }
    };
    let retry = "/api/v1/dead-letters/retry";
    let drop = "/api/v1/dead-letters/drop";

    let (s, b, _) = post(retry, READ_TOKEN, format!(r#"{{"seqs":[{}]}}"#, seqs[1])).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (s, b, _) = post(
        retry,
        WRITE_TOKEN,
        format!(r#"{{"seqs":[{}, 9999]}}"#, seqs[1]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, serde_json::json!({ "retried": 1 }));
    assert_eq!(outbox.dead_letter_figures().0, 3);
    assert_eq!(
        outbox.figures().0,
        2,
        "the retried record is back in the outbox"
    );
    let mut reader = outbox.reader().unwrap();
    let back = reader
        .dead_letters(0, 10)
        .unwrap()
        .into_iter()
        .map(|d| d.seq)
        .collect::<Vec<_>>();
    assert_eq!(back, [seqs[2], seqs[3], seqs[4]]);

    let (s, b, _) = post(drop, WRITE_TOKEN, format!(r#"{{"seqs":[{}]}}"#, seqs[2])).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert_eq!(
        outbox.dead_letter_figures().0,
        3,
        "a refused drop changes nothing"
    );
    let (s, b, _) = post(drop, ADMIN_TOKEN, format!(r#"{{"seqs":[{}]}}"#, seqs[2])).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, serde_json::json!({ "dropped": 1 }));
    assert_eq!(outbox.figures().0, 2, "a dropped record does not go back");
    let (_, page, _) = call(
        &router,
        "GET",
        "/api/v1/dead-letters",
        Some(READ_TOKEN),
        None,
    )
    .await;
    let left: Vec<u64> = page["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(left, [seqs[3], seqs[4]]);
    assert_eq!(page["total"], 2);

    let (s, b, _) = post(retry, WRITE_TOKEN, r#"{"all":true}"#.into()).await;
    assert_eq!(
        (s, b),
        (StatusCode::OK, serde_json::json!({ "retried": 2 }))
    );
    assert_eq!(outbox.dead_letter_figures(), (0, 0));
    assert_eq!(outbox.figures().0, 4);
    let (s, b, _) = post(drop, ADMIN_TOKEN, r#"{"all":true}"#.into()).await;
    assert_eq!(
        (s, b),
        (StatusCode::OK, serde_json::json!({ "dropped": 0 }))
    );
    assert_eq!(outbox.figures().0, 4, "drop touches only dead letters");
    let (_, page, _) = call(
        &router,
        "GET",
        "/api/v1/dead-letters",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (&page["dead_letters"], &page["total"], &page["bytes"]),
        (
            &serde_json::json!([]),
            &serde_json::json!(0),
            &serde_json::json!(0)
        )
    );
    stop.cancel();
}

/// A retry or drop body is exactly one of `{"seqs": [..]}` and `{"all": true}`; anything else is
/// refused naming the field, and changes nothing.
#[tokio::test]
async fn dead_letter_bodies_must_choose_exactly_one_selection() {
    let dir = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (outbox, seqs, _writer) =
        outbox_with_dead_letters(dir.path(), 2, &[0, 1], stop.clone()).await;
    let router = router(state(dir.path()).with_outbox(outbox.clone()));
    let both = format!(r#"{{"seqs":[{}],"all":true}}"#, seqs[0]);
    let cases: [(&str, StatusCode, &str, Option<&str>); 9] = [
        (
            "{}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("seqs"),
        ),
        (
            &both,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("all"),
        ),
        (
            r#"{"all":false}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("all"),
        ),
        (
            r#"{"seqs":[]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("seqs"),
        ),
        (
            r#"{"seqs":"1"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_type",
            Some("seqs"),
        ),
        (
            r#"{"seqs":[-1]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some("seqs[0]"),
        ),
        (
            r#"{"all":true,"colour":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
            Some("colour"),
        ),
        (
            r#"{"all":true"#,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        ("", StatusCode::BAD_REQUEST, "malformed_json", None),
    ];
    for path in ["/api/v1/dead-letters/retry", "/api/v1/dead-letters/drop"] {
        for (body, status, code, field) in &cases {
            let (s, b, _) = call(&router, "POST", path, Some(ADMIN_TOKEN), Some(body)).await;
            assert_eq!(
                (s, b["error"].as_str(), b["field"].as_str()),
                (*status, Some(*code), *field),
                "{path} {body}: {b}"
            );
        }
    }
    assert_eq!(outbox.dead_letter_figures().0, 2, "nothing was changed");
    assert_eq!(outbox.figures().0, 0);
    stop.cancel();
}

/// Without an outbox every dead-letter route answers 409 `no_outbox` (like `apps_disabled`),
/// documented on each; a failing outbox answers 503 `outbox_unavailable`.
#[tokio::test]
async fn dead_letter_routes_report_a_missing_or_failing_outbox() {
    let doc = openapi::document();
    let dir = tempfile::tempdir().unwrap();
    let without = router(state(dir.path()));
    let dead_letter_routes = || {
        ROUTES
            .iter()
            .filter(|s| s.path.starts_with("/api/v1/dead-letters"))
    };
    assert_eq!(dead_letter_routes().count(), 3);
    for spec in dead_letter_routes() {
        let op = &doc["paths"][spec.path][spec.method.to_ascii_lowercase()];
        for (status, code) in [("409", "no_outbox"), ("503", "outbox_unavailable")] {
            let documented = op["responses"][status]["description"]
                .as_str()
                .unwrap_or_default();
            assert!(
                documented.contains(code),
                "{} {}: {status} {code} undocumented",
                spec.method,
                spec.path
            );
        }
        let body = (spec.method == "POST").then_some(r#"{"all":true}"#);
        let (s, b, _) = call(&without, spec.method, spec.path, Some(ADMIN_TOKEN), body).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (StatusCode::CONFLICT, Some("no_outbox")),
            "{} {}: {b}",
            spec.method,
            spec.path
        );
    }

    // The listing reads the file: gone, it answers 503.
    let dir2 = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (outbox, _, writer) = outbox_with_dead_letters(dir2.path(), 1, &[0], stop.clone()).await;
    let with = router(state(dir2.path()).with_outbox(outbox.clone()));
    let moved = dir2.path().join("elsewhere.db");
    std::fs::rename(outbox.path(), &moved).unwrap();
    let (s, b, _) = call(&with, "GET", "/api/v1/dead-letters", Some(READ_TOKEN), None).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("outbox_unavailable")),
        "{b}"
    );
    assert!(
        b["message"].as_str().unwrap().contains("outbox.db"),
        "names the file: {b}"
    );
    std::fs::rename(&moved, outbox.path()).unwrap();
    // Retry and drop go through the writer: stopped, they answer 503 and change nothing.
    stop.cancel();
    writer.await.unwrap().unwrap();
    for path in ["/api/v1/dead-letters/retry", "/api/v1/dead-letters/drop"] {
        let (s, b, _) = call(
            &with,
            "POST",
            path,
            Some(ADMIN_TOKEN),
            Some(r#"{"all":true}"#),
        )
        .await;
        assert_eq!(
            (s, b["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("outbox_unavailable")),
            "{path}: {b}"
        );
    }
    assert_eq!(outbox.dead_letter_figures().0, 1);
}

/// Tokens created through the API work at once, survive a restart (a new router over the same
/// registry), are listed without digests next to the config's, and grant nothing once revoked;
/// names are unique across both sources, config tokens cannot be revoked here, bad bodies name
/// the field.
#[tokio::test]
async fn tokens_are_created_listed_used_and_revoked_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(state(dir.path()));
    let create = |body: &'static str| {
        let router = router.clone();
        async move {
            call(
                &router,
                "POST",
                "/api/v1/tokens",
                Some(ADMIN_TOKEN),
                Some(body),
            )
            .await
        }
    };
    let (status, created, _) =
        create(r#"{"name": "installer", "scopes": ["read", "write"]}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert_eq!(created["created_by"], "a");
    // It works at once, with its scope and no more.
    let (status, _, _) = call(&router, "GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = call(&router, "GET", "/api/v1/tokens", Some(&token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Conflicts and bad bodies.
    for (body, field, status) in [
        (
            r#"{"name": "installer", "scopes": ["read"]}"#,
            "name",
            StatusCode::CONFLICT,
        ),
        (
            r#"{"name": "a", "scopes": ["read"]}"#,
            "name",
            StatusCode::CONFLICT,
        ),
        (
            r#"{"name": "Bad Name", "scopes": ["read"]}"#,
            "name",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"name": "x", "scopes": ["root"]}"#,
            "scopes[0]",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"name": "x", "scopes": []}"#,
            "scopes",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"name": "x", "scopes": ["read"], "extra": 1}"#,
            "extra",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (got, answer, _) = create(body).await;
        assert_eq!(
            (got, answer["field"].as_str()),
            (status, Some(field)),
            "{body}: {answer}"
        );
    }
    // Listed with the config's, never with a digest or the token.
    let (_, listed, _) = call(&router, "GET", "/api/v1/tokens", Some(ADMIN_TOKEN), None).await;
    let names: Vec<(String, String, String)> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["scope"].as_str().unwrap().to_owned(),
                t["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("r".into(), "read".into(), "config".into()),
            ("w".into(), "write".into(), "config".into()),
            ("a".into(), "admin".into(), "config".into()),
            ("installer".into(), "write".into(), "api".into()),
        ]
    );
    assert!(!listed.to_string().contains(&token));

    // A restart: the registry still has it.
    let reopened = {
        let mut s = state(dir.path());
        // The registry file is shared; a second handle reads what the first wrote.
        let tokens = TokenSet::of(vec![TokenSet::single("a", ADMIN_TOKEN, Scope::Admin)]);
        tokens.load_created(s.registry.api_tokens().unwrap());
        s.tokens = Arc::new(tokens);
        super::router(s)
    };
    let (status, _, _) = call(&reopened, "GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);

    // Revoked: gone at once, and from the registry.
    let (status, body, _) = call(
        &router,
        "DELETE",
        "/api/v1/tokens/a",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("config_token"))
    );
    let (status, _, _) = call(
        &router,
        "DELETE",
        "/api/v1/tokens/nobody",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        &router,
        "DELETE",
        "/api/v1/tokens/installer",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(&router, "GET", "/api/v1/devices", Some(&token), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let s = state(dir.path());
    assert!(s.registry.api_tokens().unwrap().is_empty());
}

/// A request with `headers`; (status, JSON body, response headers).
async fn call_with(
    router: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (StatusCode, serde_json::Value, axum::http::HeaderMap) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

/// `GET /api/v1/devices` with only the session cookie `cookie`: its status.
async fn devices_with(router: &Router, cookie: &str) -> StatusCode {
    call_with(
        router,
        "GET",
        "/api/v1/devices",
        &[("cookie", cookie)],
        None,
    )
    .await
    .0
}

/// The web console's sessions: a token is traded for an HttpOnly SameSite=Strict cookie; the
/// cookie reads, writes only with the CSRF header, grants no more than its token's scope, ends
/// when its token is revoked or at sign-out; a wrong token opens nothing.
#[tokio::test]
async fn console_sessions_need_csrf_to_write_and_end_with_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path());
    let tokens = Arc::clone(&state.tokens);
    let router = router(state);
    let (status, body, _) = call_with(
        &router,
        "POST",
        "/api/v1/session",
        &[],
        Some(r#"{"token": "nope"}"#),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (status, body, headers) = call_with(
        &router,
        "POST",
        "/api/v1/session",
        &[],
        Some(&format!(r#"{{"token": "{WRITE_TOKEN}"}}"#)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["name"].as_str(), body["scope"].as_str()),
        (Some("w"), Some("write"))
    );
    let csrf = body["csrf"].as_str().unwrap().to_owned();
    let set_cookie = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let status = devices_with(&router, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = call_with(
        &router,
        "GET",
        "/api/v1/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(
        (status, body["csrf"].as_str()),
        (StatusCode::OK, Some(csrf.as_str()))
    );
    let new_device = Some(r#"{"id": "console-1"}"#);
    let (status, body, _) = call_with(
        &router,
        "POST",
        "/api/v1/devices",
        &[("cookie", &cookie)],
        new_device,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("csrf")),
        "{body}"
    );
    let (status, body, _) = call_with(
        &router,
        "POST",
        "/api/v1/devices",
        &[("cookie", &cookie), ("x-csrf-token", "forged")],
        new_device,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("csrf"))
    );
    let with_csrf = [("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())];
    let (status, _, _) =
        call_with(&router, "POST", "/api/v1/devices", &with_csrf, new_device).await;
    assert_eq!(status, StatusCode::CREATED);
    // No more than the token's scope: deleting needs admin.
    let (status, _, _) = call_with(
        &router,
        "DELETE",
        "/api/v1/devices/console-1",
        &with_csrf,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Sign out: the cookie is cleared and the session no longer works.
    let (status, _, headers) =
        call_with(&router, "DELETE", "/api/v1/session", &with_csrf, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let status = devices_with(&router, &cookie).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A new session; its token goes (a reload without it): the session ends.
    let (_, _, headers) = call_with(
        &router,
        "POST",
        "/api/v1/session",
        &[],
        Some(&format!(r#"{{"token": "{READ_TOKEN}"}}"#)),
    )
    .await;
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let status = devices_with(&router, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    tokens.replace_configured(&outpost_config::ApiConfig::default());
    let status = devices_with(&router, &cookie).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

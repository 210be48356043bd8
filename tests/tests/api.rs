//! The management API and the `outpost devices` / `outpost token` CLI against the real binary:
//! device CRUD, secrets (shown once, never stored in clear, rotation effective at once), token
//! scopes, JSON errors naming the field, pagination and filters, command queues, and the OpenAPI
//! document against the routes the listener really serves.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use outpost_e2e::admin::sha256_hex;
use outpost_e2e::daemon::{Daemon, outpost_cli, outpost_cli_env};
use outpost_e2e::http::Response;
use serde_json::Value;

const READ: &str = "read-token-for-tests-000000000000";
const WRITE: &str = "write-token-for-tests-00000000000";
const ADMIN: &str = "admin-token-for-tests-00000000000";

fn tokens_config() -> String {
    [
        ("reader", READ, "read"),
        ("writer", WRITE, "write"),
        ("root", ADMIN, "admin"),
    ]
    .iter()
    .map(|(name, token, scope)| {
        format!(
            "[[api.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"{scope}\"]\n\n",
            sha256_hex(token)
        )
    })
    .collect()
}

fn start() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &tokens_config());
    (dir, d)
}

#[track_caller]
fn expect(r: &Response, status: u16) -> Value {
    assert_eq!(r.status, status, "body: {}", r.text());
    if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

/// Checks a JSON error: status, code and the named field.
#[track_caller]
fn expect_error(r: &Response, status: u16, code: &str, field: Option<&str>) {
    let v = expect(r, status);
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["field"].as_str(), field, "{v}");
}

/// Every text and blob value in every table of registry.db.
fn all_stored_values(data_dir: &std::path::Path) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.iter().any(|t| t == "devices"), "{tables:?}");
    let mut values = Vec::new();
    for table in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        values.push(t.to_vec());
                    }
                    _ => {}
                }
            }
        }
    }
    values
}

#[track_caller]
fn assert_not_stored(d: &Daemon, secret: &str) {
    for value in all_stored_values(&d.data_dir) {
        assert!(
            !value.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is stored in clear: {}",
            String::from_utf8_lossy(&value)
        );
    }
    for file in ["registry.db", "registry.db-wal"] {
        let bytes = std::fs::read(d.data_dir.join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{file}"
        );
    }
    assert!(
        !d.logs().iter().any(|l| l.contains(secret)),
        "the secret is in the log"
    );
}

fn ingest(d: &Daemon, id: &str, secret: &str) -> u16 {
    let auth = format!("Bearer {id}:{secret}");
    d.request(
        "POST",
        "/api/v1/ingest/t/1",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"v": 1}"#,
    )
    .status
}

#[test]
fn device_crud_enable_disable_and_rotate_through_the_api() {
    let (_dir, d) = start();
    let created = expect(
        &d.post(
            "/api/v1/devices",
            WRITE,
            r#"{"id": "pump-1", "name": "Pump 1", "model": "P100", "batch": "B-7",
                "firmware": "1.2.3", "location": "pump house", "tags": ["water", "north"],
                "protocols": ["http", "mqtt"]}"#,
        ),
        201,
    );
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 64);
    let device = &created["device"];
    assert_eq!(device["id"], "pump-1");
    assert_eq!(device["batch"], "B-7");
    assert_eq!(device["has_secret"], true);
    assert_eq!(device["source"], "api");
    assert_eq!(device["enabled"], true);
    assert_eq!(device["state"], "offline");
    assert_eq!(device["protocols"], serde_json::json!(["mqtt", "http"]));

    // The secret is never shown again, and never stored or logged in clear.
    let shown = d.get_with_token("/api/v1/devices/pump-1", READ);
    let v = expect(&shown, 200);
    assert_eq!(v["name"], "Pump 1");
    assert!(!shown.text().contains(&secret));
    assert!(
        v.get("secret").is_none() && v.get("secret_hash").is_none(),
        "{v}"
    );
    let listed = d.get_with_token("/api/v1/devices", READ);
    assert!(!listed.text().contains(&secret));
    assert_not_stored(&d, &secret);

    // The secret works for ingestion; the device is then online with counted traffic.
    assert_eq!(ingest(&d, "pump-1", &secret), 201);
    let status = expect(
        &d.get_with_token("/api/v1/devices/pump-1/status", READ),
        200,
    );
    assert_eq!(status["state"], "online", "{status}");
    assert_eq!(status["messages"], 1, "{status}");

    let patched = expect(
        &d.patch(
            "/api/v1/devices/pump-1",
            WRITE,
            r#"{"firmware": "1.3.0", "tags": ["water"]}"#,
        ),
        200,
    );
    assert_eq!(patched["firmware"], "1.3.0");
    assert_eq!(patched["tags"], serde_json::json!(["water"]));
    assert_eq!(patched["name"], "Pump 1", "absent fields are kept");

    let disabled = expect(&d.post("/api/v1/devices/pump-1/disable", WRITE, ""), 200);
    assert_eq!(
        (disabled["enabled"].clone(), disabled["state"].clone()),
        (false.into(), "disabled".into())
    );
    assert_eq!(
        ingest(&d, "pump-1", &secret),
        403,
        "a disabled device is refused"
    );
    let enabled = expect(&d.post("/api/v1/devices/pump-1/enable", WRITE, ""), 200);
    assert_eq!(enabled["enabled"], true);
    assert_eq!(ingest(&d, "pump-1", &secret), 201);

    let rotated = expect(
        &d.post("/api/v1/devices/pump-1/rotate-secret", ADMIN, ""),
        200,
    );
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["device"]["id"], "pump-1");
    assert_eq!(
        ingest(&d, "pump-1", &secret),
        401,
        "the old secret stops working at once"
    );
    assert_eq!(ingest(&d, "pump-1", &new_secret), 201);
    assert_not_stored(&d, &new_secret);

    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "pump-1"}"#),
        409,
        "already_exists",
        Some("id"),
    );
    assert_eq!(d.delete("/api/v1/devices/pump-1", ADMIN).status, 204);
    expect_error(
        &d.get_with_token("/api/v1/devices/pump-1", READ),
        404,
        "not_found",
        None,
    );
    expect_error(
        &d.delete("/api/v1/devices/pump-1", ADMIN),
        404,
        "not_found",
        None,
    );
    assert_eq!(
        ingest(&d, "pump-1", &new_secret),
        401,
        "a deleted device is refused"
    );
}

#[test]
fn tokens_and_scopes_are_enforced() {
    let (_dir, d) = start();
    // Missing and wrong tokens: 401 with a Bearer challenge and a JSON error.
    for r in [
        d.get_with_token("/api/v1/devices", ""),
        d.get_with_token("/api/v1/devices", "not-a-token"),
        d.request(
            "GET",
            "/api/v1/devices",
            &[("Authorization", "Basic YTpi")],
            b"",
        ),
        d.post("/api/v1/devices", "", r#"{"id": "x"}"#),
    ] {
        expect_error(&r, 401, "unauthorized", None);
        assert!(
            r.header("www-authenticate").unwrap().starts_with("Bearer"),
            "{:?}",
            r.headers
        );
    }
    // Read token on write routes, write token on admin routes: 403.
    expect_error(
        &d.post("/api/v1/devices", READ, r#"{"id": "x"}"#),
        403,
        "forbidden",
        None,
    );
    expect(&d.post("/api/v1/devices", WRITE, r#"{"id": "x"}"#), 201);
    expect_error(
        &d.post("/api/v1/devices/x/disable", READ, ""),
        403,
        "forbidden",
        None,
    );
    expect_error(
        &d.delete("/api/v1/devices/x", WRITE),
        403,
        "forbidden",
        None,
    );
    expect_error(
        &d.post("/api/v1/devices/x/rotate-secret", WRITE, ""),
        403,
        "forbidden",
        None,
    );
    expect_error(
        &d.post("/api/v1/devices/x/commands", READ, r#"{"payload": 1}"#),
        403,
        "forbidden",
        None,
    );
    // Higher scopes include lower ones.
    expect(&d.get_with_token("/api/v1/devices/x", READ), 200);
    expect(&d.get_with_token("/api/v1/devices/x", ADMIN), 200);
    expect(&d.post("/api/v1/devices/x/disable", ADMIN, ""), 200);
    assert_eq!(d.delete("/api/v1/devices/x", ADMIN).status, 204);
    // The OpenAPI document and the health endpoints need no token.
    assert_eq!(d.get("/api/v1/openapi.json").0, 200);
    assert_eq!(d.get("/healthz").0, 200);
}

#[test]
fn bad_requests_answer_json_naming_the_field() {
    let (_dir, d) = start();
    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "a", "name": "x""#),
        400,
        "malformed_json",
        None,
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, "not json"),
        400,
        "malformed_json",
        None,
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, ""),
        400,
        "malformed_json",
        None,
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "a", "colour": "red"}"#),
        422,
        "unknown_field",
        Some("colour"),
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "a", "enabled": "yes"}"#),
        422,
        "invalid_type",
        Some("enabled"),
    );
    expect_error(
        &d.post(
            "/api/v1/devices",
            WRITE,
            r#"{"id": "a", "tags": ["ok", 7]}"#,
        ),
        422,
        "invalid_type",
        Some("tags[1]"),
    );
    expect_error(
        &d.post(
            "/api/v1/devices",
            WRITE,
            r#"{"id": "a", "protocols": ["smtp"]}"#,
        ),
        422,
        "invalid_value",
        Some("protocols[0]"),
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"name": "a"}"#),
        422,
        "missing_field",
        Some("id"),
    );
    expect_error(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "has space"}"#),
        422,
        "invalid_value",
        Some("id"),
    );
    expect(&d.post("/api/v1/devices", WRITE, r#"{"id": "a"}"#), 201);
    expect_error(
        &d.patch("/api/v1/devices/a", WRITE, r#"{"firmware": 2}"#),
        422,
        "invalid_type",
        Some("firmware"),
    );
    expect_error(
        &d.patch("/api/v1/devices/a", WRITE, r#"{"secret": "mine"}"#),
        422,
        "unknown_field",
        Some("secret"),
    );
    expect_error(
        &d.post(
            "/api/v1/devices/a/commands",
            WRITE,
            r#"{"payload": 1, "ttl": 10}"#,
        ),
        422,
        "invalid_type",
        Some("ttl"),
    );
    expect_error(
        &d.post(
            "/api/v1/devices/a/commands",
            WRITE,
            r#"{"payload": 1, "ttl": "soon"}"#,
        ),
        422,
        "invalid_value",
        Some("ttl"),
    );
    expect_error(
        &d.post("/api/v1/devices/a/commands", WRITE, r#"{"ttl": "1m"}"#),
        422,
        "missing_field",
        Some("payload"),
    );
    expect_error(
        &d.get_with_token("/api/v1/devices?limit=many", READ),
        400,
        "bad_request",
        Some("limit"),
    );
    expect_error(
        &d.get_with_token("/api/v1/devices?sort=id", READ),
        400,
        "bad_request",
        Some("sort"),
    );
}

/// An unknown route and a wrong method get the same JSON error shape as every other error
/// (docs/HTTP.md), and a 405 says which methods the path allows.
#[test]
fn unknown_routes_and_wrong_methods_answer_the_json_error_shape() {
    let (_dir, d) = start();
    let r = d.get_with_token("/api/v1/nope", READ);
    expect_error(&r, 404, "not_found", None);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("/api/v1/nope")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    for (method, path, allow) in [
        ("GET", "/api/v1/ingest/room/temp", "POST"),
        ("DELETE", "/api/v1/devices", "GET,POST"),
        ("PUT", "/api/v1/devices/h1", "GET,PATCH,DELETE"),
        ("POST", "/healthz", "GET"),
    ] {
        let auth = format!("Bearer {ADMIN}");
        let r = d.request(method, path, &[("Authorization", &auth)], b"");
        expect_error(&r, 405, "method_not_allowed", None);
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let mut allowed: Vec<&str> = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"))
            .split(',')
            .map(str::trim)
            .collect();
        let mut expected: Vec<&str> = allow.split(',').collect();
        allowed.sort_unstable();
        expected.sort_unstable();
        // axum adds HEAD wherever GET is served.
        allowed.retain(|m| *m != "HEAD");
        assert_eq!(allowed, expected, "{method} {path}");
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(method) && message.contains(path),
            "{message}"
        );
    }
}

#[test]
fn listing_is_paginated_in_id_order_and_filtered() {
    let (_dir, d) = start();
    for i in 0..7 {
        let tags = if i % 2 == 0 {
            r#"["even"]"#
        } else {
            r#"["odd"]"#
        };
        expect(
            &d.post(
                "/api/v1/devices",
                WRITE,
                &format!(r#"{{"id": "dev-{i}", "tags": {tags}}}"#),
            ),
            201,
        );
    }
    expect(&d.post("/api/v1/devices/dev-3/disable", WRITE, ""), 200);

    let mut ids = Vec::new();
    let mut path = "/api/v1/devices?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = expect(&d.get_with_token(&path, READ), 200);
        pages += 1;
        ids.extend(
            page["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/devices?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids, (0..7).map(|i| format!("dev-{i}")).collect::<Vec<_>>());

    let ids_of = |path: &str| -> Vec<String> {
        expect(&d.get_with_token(path, READ), 200)["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids_of("/api/v1/devices?tag=odd"),
        ["dev-1", "dev-3", "dev-5"]
    );
    assert_eq!(ids_of("/api/v1/devices?state=disabled"), ["dev-3"]);
    assert_eq!(
        ids_of("/api/v1/devices?tag=odd&state=offline"),
        ["dev-1", "dev-5"]
    );
    assert!(ids_of("/api/v1/devices?state=online").is_empty());
    let page = expect(
        &d.get_with_token("/api/v1/devices?tag=even&limit=2", READ),
        200,
    );
    assert_eq!(page["next_cursor"], "dev-2");
}

#[test]
fn commands_are_queued_and_report_their_state() {
    let (_dir, d) = start();
    expect(&d.post("/api/v1/devices", WRITE, r#"{"id": "valve"}"#), 201);
    let queued = d.post(
        "/api/v1/devices/valve/commands",
        WRITE,
        r#"{"payload": {"open": 40}, "ttl": "10m"}"#,
    );
    let c = expect(&queued, 201);
    assert_eq!(c["state"], "queued");
    assert_eq!(c["payload"], serde_json::json!({"open": 40}));
    let id = c["id"].as_i64().unwrap();
    assert_eq!(
        queued.header("location").unwrap(),
        format!("/api/v1/devices/valve/commands/{id}")
    );
    let ttl = c["expires_at_ms"].as_i64().unwrap() - c["created_at_ms"].as_i64().unwrap();
    assert_eq!(ttl, 600_000);

    let short = expect(
        &d.post(
            "/api/v1/devices/valve/commands",
            WRITE,
            r#"{"payload": "blink", "ttl": "1ms"}"#,
        ),
        201,
    );
    #[allow(clippy::disallowed_methods)] // blocking test code: no async runtime here
    std::thread::sleep(std::time::Duration::from_millis(20));
    let one = expect(
        &d.get_with_token(
            &format!("/api/v1/devices/valve/commands/{}", short["id"]),
            READ,
        ),
        200,
    );
    assert_eq!(one["state"], "expired");
    let list = expect(
        &d.get_with_token("/api/v1/devices/valve/commands", READ),
        200,
    );
    let states: Vec<&str> = list["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "expired"]);

    expect_error(
        &d.get_with_token("/api/v1/devices/valve/commands/99999", READ),
        404,
        "not_found",
        None,
    );
    expect_error(
        &d.post(
            "/api/v1/devices/nobody/commands",
            WRITE,
            r#"{"payload": 1}"#,
        ),
        404,
        "not_found",
        None,
    );
    // Bounded: 100 queued per device, then 409 until some are delivered or expire.
    for i in 1..100 {
        expect(
            &d.post(
                "/api/v1/devices/valve/commands",
                WRITE,
                &format!(r#"{{"payload": {i}}}"#),
            ),
            201,
        );
    }
    expect_error(
        &d.post(
            "/api/v1/devices/valve/commands",
            WRITE,
            r#"{"payload": "more"}"#,
        ),
        409,
        "command_queue_full",
        None,
    );
}

/// Every route in the OpenAPI document answers on the real listener (not 404/405).
#[test]
fn openapi_document_matches_the_served_routes() {
    let (_dir, d) = start();
    let (code, body) = d.get("/api/v1/openapi.json");
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let created = expect(
        &d.post("/api/v1/devices", WRITE, r#"{"id": "doc-dev"}"#),
        201,
    );
    let secret = created["secret"].as_str().unwrap().to_owned();
    let cmd = expect(
        &d.post(
            "/api/v1/devices/doc-dev/commands",
            WRITE,
            r#"{"payload": 1}"#,
        ),
        201,
    );
    let device_auth = format!("Bearer doc-dev:{secret}");
    let admin_auth = format!("Bearer {ADMIN}");
    // An edge rule named like the config token below, so that its DELETE finds one.
    expect(
        &d.request(
            "PUT",
            "/api/v1/edge/rules/root",
            &[
                ("Authorization", &admin_auth),
                ("Content-Type", "application/json"),
            ],
            br#"{"enrich": ["name"]}"#,
        ),
        201,
    );

    let mut operations: Vec<(String, String)> = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            operations.push((method.to_uppercase(), path.clone()));
        }
    }
    // Delete last so the device exists for every other route.
    operations.sort_by_key(|(m, _)| m == "DELETE");
    assert!(operations.len() >= 19, "{operations:?}");
    for (method, template) in operations {
        let path = template
            .replace("{id}", "doc-dev")
            .replace("{cid}", &cmd["id"].to_string())
            .replace("{topic}", "doc/topic")
            // A config token: revoking it answers 409 (apps are off: their routes answer 409).
            .replace("{name}", "root");
        let auth =
            if template.starts_with("/api/v1/ingest") || template == "/api/v1/device/commands" {
                device_auth.as_str()
            } else {
                admin_auth.as_str()
            };
        let (ct, body): (&str, &[u8]) = if method == "GET" || method == "DELETE" {
            ("application/json", b"")
        } else {
            ("application/json", b"{}")
        };
        let r = d.request(
            &method,
            &path,
            &[("Authorization", auth), ("Content-Type", ct)],
            body,
        );
        assert!(
            r.status != 404 && r.status != 405,
            "{method} {template} is documented but answers {}: {}",
            r.status,
            r.text()
        );
    }
}

/// The served document is valid OpenAPI 3.0 by an independent validator (`openapi-spec-validator`
/// from PyPI, installed by scripts/setup-test-deps.sh). The same validator refuses the document
/// with one schema written in 3.1 syntax (a type array, the mistake an earlier version made), so
/// this test can fail.
#[test]
fn the_openapi_document_passes_an_openapi_validator() {
    let (dir, d) = start();
    let (code, body) = d.get("/api/v1/openapi.json");
    assert_eq!(code, 200, "{body}");
    let validate = |doc: &Value, name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, doc.to_string()).unwrap();
        std::process::Command::new("python3")
            .args(["-m", "openapi_spec_validator"])
            .arg(&file)
            .output()
            .expect("python3 -m openapi_spec_validator (scripts/setup-test-deps.sh installs it)")
    };
    let doc: Value = serde_json::from_str(&body).unwrap();
    let out = validate(&doc, "openapi.json");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut broken = doc.clone();
    let schemas = broken["components"]["schemas"].as_object_mut().unwrap();
    let (_, first) = schemas.iter_mut().next().unwrap();
    *first = serde_json::json!({"type": ["string", "null"]});
    let out = validate(&broken, "broken.json");
    assert!(
        !out.status.success(),
        "the validator accepted a 3.1 type array in a 3.0.3 document"
    );
}

#[test]
fn cli_manages_devices_with_a_token_from_token_new() {
    // `outpost token new` prints a token and the config entry holding only its digest.
    let (code, out, err) = outpost_cli(&[
        "token",
        "new",
        "--name",
        "ops",
        "--scopes",
        "read,admin",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let t: Value = serde_json::from_str(&out).unwrap();
    let token = t["token"].as_str().unwrap().to_owned();
    assert_eq!(t["sha256"].as_str().unwrap(), sha256_hex(&token));
    let (code, text, _) = outpost_cli(&["token", "new", "--name", "ops", "--scopes", "write"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("[[api.tokens]]\nname = \"ops\"\nsha256 = \""),
        "{text}"
    );
    assert!(text.contains("scopes = [\"write\"]"), "{text}");
    let (code, _, err) = outpost_cli(&["token", "new", "--scopes", "root"]);
    assert_eq!(code, 2, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[api.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"read\", \"admin\"]\n",
        t["sha256"].as_str().unwrap()
    );
    let d = Daemon::start(dir.path(), &config);
    let url = format!("http://{}", d.admin);
    let cli = |args: &[&str]| {
        let mut all = vec!["devices"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--url", &url]);
        outpost_cli_env(&all, &[("OUTPOST_API_TOKEN", &token)])
    };

    let (code, out, err) = cli(&[
        "add",
        "meter-7",
        "--name",
        "Meter 7",
        "--model",
        "M2",
        "--batch",
        "2024-11",
        "--tag",
        "power",
        "--tag",
        "hall",
        "--protocols",
        "mqtt,http",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("meter-7") && out.contains("Meter 7"), "{out}");
    let secret = outpost_e2e::admin::secret_in(&out);
    assert_eq!(ingest(&d, "meter-7", &secret), 201);
    assert_not_stored(&d, &secret);

    let (code, out, _) = cli(&["list"]);
    assert_eq!(code, 0);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(
        out.contains("meter-7") && out.contains("mqtt,http") && out.contains("power,hall"),
        "{out}"
    );
    assert!(!out.contains(&secret));

    let (code, out, _) = cli(&["show", "meter-7"]);
    assert_eq!(code, 0);
    assert!(out.contains("batch:      2024-11"), "{out}");
    assert!(out.contains("state:      online"), "{out}");
    assert!(out.contains("messages:   1"), "{out}");
    assert!(!out.contains(&secret));

    let (code, out, _) = cli(&["disable", "meter-7"]);
    assert_eq!((code, out.trim()), (0, "Device meter-7 disabled."));
    let (_, out, _) = cli(&["list", "--state", "disabled", "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["devices"][0]["id"], "meter-7");
    assert_eq!(ingest(&d, "meter-7", &secret), 403);
    let (code, _, _) = cli(&["enable", "meter-7"]);
    assert_eq!(code, 0);
    assert_eq!(ingest(&d, "meter-7", &secret), 201);

    let (code, out, err) = cli(&["rotate-secret", "meter-7"]);
    assert_eq!(code, 0, "{err}");
    let new_secret = outpost_e2e::admin::secret_in(&out);
    assert_ne!(new_secret, secret);
    assert_eq!(ingest(&d, "meter-7", &secret), 401);
    assert_eq!(ingest(&d, "meter-7", &new_secret), 201);

    let (code, out, _) = cli(&["remove", "meter-7"]);
    assert_eq!((code, out.trim()), (0, "Device meter-7 removed."));
    let (code, _, err) = cli(&["show", "meter-7"]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("meter-7"), "{err}");

    // Errors: a wrong token, no token, an unreachable daemon.
    let (code, _, err) = outpost_cli_env(
        &["devices", "list", "--url", &url],
        &[("OUTPOST_API_TOKEN", "wrong")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    // Tokens never on the command line (every user sees it in `ps`); a file works.
    let (code, _, err) = outpost_cli(&["devices", "list", "--url", &url, "--token", &token]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--token is not accepted") && err.contains("OUTPOST_API_TOKEN"),
        "{err}"
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (code, out, err) = outpost_cli(&[
        "devices",
        "list",
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    let (code, _, err) = outpost_cli(&["devices", "list", "--url", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("OUTPOST_API_TOKEN"), "{err}");
    let (code, _, err) = outpost_cli(&[
        "devices",
        "list",
        "--url",
        "http://127.0.0.1:1",
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn a_device_s_own_mqtt_acl_is_set_checked_and_cleared_through_the_api() {
    let (_dir, d) = start();
    // A bad pattern: 422 naming the field and the index.
    expect_error(
        &d.post(
            "/api/v1/devices",
            WRITE,
            r#"{"id": "m", "mqtt_publish": ["plant/{id}/#", "a/#/b"]}"#,
        ),
        422,
        "invalid_value",
        Some("mqtt_publish[1]"),
    );
    let created = expect(
        &d.post(
            "/api/v1/devices",
            WRITE,
            r#"{"id": "m", "mqtt_publish": ["plant/{id}/#"]}"#,
        ),
        201,
    );
    assert_eq!(
        created["device"]["mqtt_publish"],
        serde_json::json!(["plant/{id}/#"])
    );
    assert_eq!(created["device"]["mqtt_subscribe"], Value::Null, "global");
    expect_error(
        &d.patch(
            "/api/v1/devices/m",
            WRITE,
            r#"{"mqtt_subscribe": ["x/{name}"]}"#,
        ),
        422,
        "invalid_value",
        Some("mqtt_subscribe[0]"),
    );
    expect_error(
        &d.patch("/api/v1/devices/m", WRITE, r#"{"mqtt_subscribe": "x/#"}"#),
        422,
        "invalid_type",
        Some("mqtt_subscribe"),
    );
    // Absent keeps a list, null clears it.
    let patched = expect(
        &d.patch(
            "/api/v1/devices/m",
            WRITE,
            r#"{"name": "meter", "mqtt_subscribe": ["plant/{id}/cmd/#"]}"#,
        ),
        200,
    );
    assert_eq!(
        (&patched["mqtt_publish"], &patched["mqtt_subscribe"]),
        (
            &serde_json::json!(["plant/{id}/#"]),
            &serde_json::json!(["plant/{id}/cmd/#"])
        )
    );
    let patched = expect(
        &d.patch("/api/v1/devices/m", WRITE, r#"{"mqtt_publish": null}"#),
        200,
    );
    assert_eq!(patched["mqtt_publish"], Value::Null);
    assert_eq!(
        patched["mqtt_subscribe"],
        serde_json::json!(["plant/{id}/cmd/#"])
    );
    let shown = expect(&d.get_with_token("/api/v1/devices/m", READ), 200);
    assert_eq!(shown, patched);
}

/// The web console in a real browser (headless Chromium driven through WebDriver by
/// `tests/peers/console_check.py`): sign in, add a device, `mosquitto_pub` with its
/// credentials and the reading appears live, disable it (its next publish is refused), sign out;
/// a `read` token sees no write controls and its writes are refused, even with the CSRF token;
/// the session cookie is invisible to scripts. `OUTPOST_CONSOLE_SCREENSHOTS=<dir>` keeps a
/// screenshot of each page (docs/console/).
#[test]
fn the_web_console_adds_a_device_shows_its_readings_live_and_respects_scopes() {
    outpost_e2e::require_command("chromium");
    outpost_e2e::require_command("chromedriver");
    let (_dir, mut d) = start();
    let mqtt_port = d.listener("MQTT").port();
    let script = outpost_e2e::manifest_dir().join("peers/console_check.py");
    let shots = std::env::var("OUTPOST_CONSOLE_SCREENSHOTS").unwrap_or_default();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([
            &format!("http://{}", d.admin),
            ADMIN,
            READ,
            &mqtt_port.to_string(),
            &shots,
        ])
        .output()
        .expect("python3 console_check.py (scripts/setup-test-deps.sh installs selenium)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["ok"], true, "{seen}");
    assert_eq!(seen["cookie_visible_to_script"], "", "{seen}");
    assert_eq!(seen["reading_count"], "1", "{seen}");
    assert_ne!(seen["disabled_publish_exit"], 0, "{seen}");
    assert_eq!(seen["read_add_buttons"], 0, "{seen}");
    assert_eq!(seen["read_write_buttons"], 0, "{seen}");
    assert_eq!(seen["read_write_status"], 403, "{seen}");
    assert_eq!(seen["no_csrf_status"], 403, "{seen}");
    assert!(seen["overview_subsystems"].as_u64().unwrap() > 3, "{seen}");
    assert_eq!(seen["config_ok"], true, "{seen}");
    // The reading the browser showed is the one stored.
    assert_eq!(d.metric("outpost_outbox_records"), 1.0);
    // Neither the tokens signed in with nor the device's secret reach the log.
    let secret = seen["secret"].as_str().unwrap();
    for line in d.logs() {
        assert!(
            !line.contains(ADMIN) && !line.contains(READ) && !line.contains(secret),
            "a secret in the log: {line}"
        );
    }
}

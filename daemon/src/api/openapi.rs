//! The OpenAPI 3.0 document served at `GET /api/v1/openapi.json`, written by hand.
//!
//! It covers every route of the admin listener: the management routes of this module's
//! [`super::ROUTES`] (their scopes come from that list), device-facing HTTP ingestion and
//! command polling, and the gateway's own status, health and metrics endpoints. Tests check that
//! the management part and [`super::ROUTES`] agree exactly, and that every documented
//! path and method answers on the real listener (neither 404 nor 405).

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use outpost_config::Scope;
use serde_json::{Map, Value, json};

use super::auth::scope_name;
use super::{ROUTES, dead_letters};
use crate::registry::{MAX_PAGE, commands};

/// `GET /api/v1/openapi.json` (no token needed).
pub async fn serve() -> Response {
    axum::Json(&*DOCUMENT).into_response()
}

static DOCUMENT: LazyLock<Value> = LazyLock::new(document);

/// Every `/api/v1/apps…` route answers this with `apps.enabled = false`.
const APPS_DISABLED: &str =
    "The apps subsystem is disabled: apps.enabled = false (`apps_disabled`)";

/// Every `/api/v1/dead-letters…` route answers this when the API has no outbox (tests only).
const NO_OUTBOX: &str = "This API was built without an outbox (`no_outbox`)";

/// Every `/api/v1/dead-letters…` route answers this when SQLite fails.
const OUTBOX_UNAVAILABLE: &str =
    "The outbox could not be read or written; nothing changed, retry (`outbox_unavailable`)";

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn json_body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn path_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": schema })
}

fn app_name_param() -> Value {
    path_param(
        "name",
        "App name",
        json!({ "type": "string", "pattern": "^[a-z0-9_-]{1,64}$" }),
    )
}

fn device_id_param() -> Value {
    path_param(
        "id",
        "Device id",
        json!({ "type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$" }),
    )
}

/// The management operation of (method, path), without security and auth responses.
fn management_operation(method: &str, path: &str) -> Option<Value> {
    let id = device_id_param();
    let app = app_name_param();
    let op = match (method, path) {
        ("GET", "/api/v1/devices") => json!({
            "operationId": "listDevices",
            "summary": "List devices in id order, filtered and paginated",
            "parameters": [
                { "name": "tag", "in": "query", "schema": { "type": "string" }, "description": "Only devices with this tag" },
                { "name": "state", "in": "query", "schema": { "type": "string", "enum": ["online", "offline", "disabled"] } },
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100 } },
                { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "`next_cursor` of the previous page" }
            ],
            "responses": {
                "200": json_response("A page of devices", "DevicePage"),
                "400": error_response("Unknown or invalid query parameter (`field` names it)")
            }
        }),
        ("POST", "/api/v1/devices") => json!({
            "operationId": "createDevice",
            "summary": "Create a device; the response carries its secret, shown this once",
            "requestBody": json_body("NewDevice"),
            "responses": {
                "201": json_response("Created", "DeviceWithSecret"),
                "400": error_response("Malformed JSON"),
                "409": error_response("A device with this id exists"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type, missing or invalid value (`field` names it)")
            }
        }),
        ("GET", "/api/v1/devices/{id}") => json!({
            "operationId": "getDevice",
            "summary": "One device",
            "parameters": [id],
            "responses": {
                "200": json_response("The device", "Device"),
                "404": error_response("No such device")
            }
        }),
        ("PATCH", "/api/v1/devices/{id}") => json!({
            "operationId": "updateDevice",
            "summary": "Change fields of a device; absent fields are kept",
            "parameters": [id],
            "requestBody": json_body("DeviceChanges"),
            "responses": {
                "200": json_response("The updated device", "Device"),
                "400": error_response("Malformed JSON"),
                "404": error_response("No such device"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or invalid value (`field` names it)")
            }
        }),
        ("DELETE", "/api/v1/devices/{id}") => json!({
            "operationId": "deleteDevice",
            "summary": "Delete a device with its monitoring and commands",
            "parameters": [id],
            "responses": {
                "204": { "description": "Deleted" },
                "404": error_response("No such device")
            }
        }),
        ("POST", "/api/v1/devices/{id}/disable") => json!({
            "operationId": "disableDevice",
            "summary": "Disable a device: every ingress path refuses it",
            "parameters": [id],
            "responses": {
                "200": json_response("The device", "Device"),
                "404": error_response("No such device")
            }
        }),
        ("POST", "/api/v1/devices/{id}/enable") => json!({
            "operationId": "enableDevice",
            "summary": "Enable a device",
            "parameters": [id],
            "responses": {
                "200": json_response("The device", "Device"),
                "404": error_response("No such device")
            }
        }),
        ("POST", "/api/v1/devices/{id}/rotate-secret") => json!({
            "operationId": "rotateDeviceSecret",
            "summary": "Give the device a new secret; the old one stops working at once",
            "parameters": [id],
            "responses": {
                "200": json_response("The device and its new secret, shown this once", "DeviceWithSecret"),
                "404": error_response("No such device")
            }
        }),
        ("GET", "/api/v1/devices/{id}/status") => json!({
            "operationId": "getDeviceStatus",
            "summary": "Monitoring of a device: state, last seen, counters, rates, signal, location",
            "parameters": [id],
            "responses": {
                "200": json_response("The monitoring fields", "DeviceStatus"),
                "404": error_response("No such device")
            }
        }),
        ("POST", "/api/v1/devices/{id}/commands") => json!({
            "operationId": "queueCommand",
            "summary": "Queue a command for the device",
            "parameters": [id],
            "requestBody": json_body("NewCommand"),
            "responses": {
                "201": json_response("Queued", "Command"),
                "400": error_response("Malformed JSON"),
                "404": error_response("No such device"),
                "409": error_response(&format!("The device already has {} queued commands", commands::MAX_QUEUED)),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or invalid value (`field` names it)")
            }
        }),
        ("GET", "/api/v1/devices/{id}/commands") => json!({
            "operationId": "listCommands",
            "summary": "Queued, delivered and expired commands of the device, oldest first",
            "parameters": [id],
            "responses": {
                "200": json_response("The commands", "CommandList"),
                "404": error_response("No such device")
            }
        }),
        ("GET", "/api/v1/devices/{id}/commands/{cid}") => json!({
            "operationId": "getCommand",
            "summary": "One command and its delivery state",
            "parameters": [id, path_param("cid", "Command id", json!({ "type": "integer", "format": "int64" }))],
            "responses": {
                "200": json_response("The command", "Command"),
                "404": error_response("No such device or command")
            }
        }),
        ("GET", "/api/v1/apps") => json!({
            "operationId": "listApps",
            "summary": "Every app (config and API) with its status, and why the engine is unreachable if it is",
            "responses": {
                "200": json_response("The apps", "AppList"),
                "409": error_response(APPS_DISABLED)
            }
        }),
        ("POST", "/api/v1/apps") => json!({
            "operationId": "createApp",
            "summary": "Declare an app; the reconcile loop starts its container",
            "requestBody": json_body("AppSpec"),
            "responses": {
                "201": json_response("Declared", "App"),
                "400": error_response("Malformed JSON"),
                "409": error_response("Name taken (`already_exists`) or apps disabled (`apps_disabled`)"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or invalid value (`field` names it)")
            }
        }),
        ("GET", "/api/v1/apps/{name}") => json!({
            "operationId": "getApp",
            "summary": "One app with its status",
            "parameters": [app],
            "responses": {
                "200": json_response("The app", "App"),
                "404": error_response("No such app"),
                "409": error_response(APPS_DISABLED)
            }
        }),
        ("PUT", "/api/v1/apps/{name}") => json!({
            "operationId": "replaceApp",
            "summary": "Replace an API app's spec; its container is recreated",
            "parameters": [app],
            "requestBody": json_body("AppSpec"),
            "responses": {
                "200": json_response("The app", "App"),
                "400": error_response("Malformed JSON"),
                "404": error_response("No such app"),
                "409": error_response("Declared in the configuration file (`declared_in_config`), or apps disabled (`apps_disabled`)"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or invalid value (`field` names it)")
            }
        }),
        ("DELETE", "/api/v1/apps/{name}") => json!({
            "operationId": "deleteApp",
            "summary": "Delete an API app; its container is removed",
            "parameters": [app],
            "responses": {
                "204": { "description": "Deleted" },
                "404": error_response("No such app"),
                "409": error_response("Declared in the configuration file (`declared_in_config`), or apps disabled (`apps_disabled`)")
            }
        }),
        ("POST", "/api/v1/apps/{name}/restart") => json!({
            "operationId": "restartApp",
            "summary": "Recreate the app's container now; clears FAILED",
            "parameters": [app],
            "responses": {
                "202": json_response("Restart requested", "App"),
                "404": error_response("No such app"),
                "409": error_response(APPS_DISABLED)
            }
        }),
        ("GET", "/api/v1/apps/{name}/logs") => json!({
            "operationId": "appLogs",
            "summary": "The container's output as plain text (stdout and stderr)",
            "parameters": [
                app,
                { "name": "tail", "in": "query", "required": false, "description": "Last N lines", "schema": { "type": "integer", "minimum": 0 } },
                { "name": "follow", "in": "query", "required": false, "description": "Keep streaming", "schema": { "type": "boolean" } }
            ],
            "responses": {
                "200": { "description": "Log text", "content": { "text/plain": { "schema": { "type": "string" } } } },
                "404": error_response("No such app, or no container yet"),
                "409": error_response(APPS_DISABLED),
                "503": error_response("The container engine is unreachable (`engine_unavailable`)")
            }
        }),
        ("GET", "/api/v1/apps/{name}/events") => json!({
            "operationId": "appEvents",
            "summary": "The app's recorded status changes (newest first, the last 100), kept in apps.db across restarts",
            "parameters": [app],
            "responses": {
                "200": { "description": "Events", "content": { "application/json": { "schema": {
                    "type": "object",
                    "properties": { "events": { "type": "array", "items": {
                        "type": "object",
                        "required": ["at_ms", "state", "restarts"],
                        "properties": {
                            "at_ms": { "type": "integer", "description": "Unix milliseconds" },
                            "state": { "type": "string", "enum": ["ACTIVE", "INACTIVE", "FAILED"] },
                            "reason": { "type": "string" },
                            "exit_code": { "type": "integer" },
                            "restarts": { "type": "integer" }
                        }
                    } } }
                } } } },
                "404": error_response("No such app"),
                "409": error_response(APPS_DISABLED)
            }
        }),
        ("POST", "/api/v1/zigbee/permit-join") => json!({
            "operationId": "zigbeePermitJoin",
            "summary": "Open the Zigbee network for joining (ZDO_MGMT_PERMIT_JOIN_REQ)",
            "requestBody": json_body("PermitJoin"),
            "responses": {
                "200": json_response("Joining permitted for the granted duration", "PermitJoinGranted"),
                "400": error_response("Malformed JSON"),
                "409": error_response("No Zigbee driver is configured (`no_zigbee_driver`)"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or a duration outside 1s..254s"),
                "502": error_response("The coordinator refused the request (`zigbee_refused`)"),
                "503": error_response("The Zigbee stick is unplugged, starting or busy; retry (`zigbee_unavailable`)")
            }
        }),
        ("GET", "/api/v1/dead-letters") => json!({
            "operationId": "listDeadLetters",
            "summary": "Records Kafka refused for good, kept in the outbox's dead-letter table; oldest first, paginated by sequence",
            "parameters": [
                { "name": "after", "in": "query", "schema": { "type": "integer", "format": "int64", "minimum": 0, "default": 0 }, "description": "Only sequences above this: `next_after` of the previous page" },
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": dead_letters::MAX_PAGE, "default": dead_letters::DEFAULT_PAGE } }
            ],
            "responses": {
                "200": json_response("A page of dead letters, with the table's totals", "DeadLetterPage"),
                "400": error_response("Unknown or invalid query parameter (`field` names it)"),
                "409": error_response(NO_OUTBOX),
                "503": error_response(OUTBOX_UNAVAILABLE)
            }
        }),
        ("POST", "/api/v1/dead-letters/retry") => json!({
            "operationId": "retryDeadLetters",
            "summary": "Put dead letters back into the outbox under their own sequences; the forwarder sends them again at once. Unknown sequences are ignored",
            "requestBody": json_body("DeadLetterSelection"),
            "responses": {
                "200": { "description": "How many were put back", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["retried"],
                    "properties": { "retried": { "type": "integer", "format": "int64" } }
                } } } },
                "400": error_response("Malformed JSON"),
                "409": error_response(NO_OUTBOX),
                "413": error_response("Body too large"),
                "422": error_response("Not exactly one of `seqs` and `all: true`, unknown field or wrong type (`field` names it)"),
                "503": error_response(OUTBOX_UNAVAILABLE)
            }
        }),
        ("POST", "/api/v1/dead-letters/drop") => json!({
            "operationId": "dropDeadLetters",
            "summary": "Delete dead letters for good. Unknown sequences are ignored",
            "requestBody": json_body("DeadLetterSelection"),
            "responses": {
                "200": { "description": "How many were deleted", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["dropped"],
                    "properties": { "dropped": { "type": "integer", "format": "int64" } }
                } } } },
                "400": error_response("Malformed JSON"),
                "409": error_response(NO_OUTBOX),
                "413": error_response("Body too large"),
                "422": error_response("Not exactly one of `seqs` and `all: true`, unknown field or wrong type (`field` names it)"),
                "503": error_response(OUTBOX_UNAVAILABLE)
            }
        }),
        ("GET", "/api/v1/tokens") => json!({
            "operationId": "listTokens",
            "summary": "Every management API token: the config's and those created through the API (never a token or digest)",
            "responses": {
                "200": { "description": "The tokens", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["tokens"],
                    "properties": { "tokens": { "type": "array", "items": { "$ref": "#/components/schemas/ApiToken" } } }
                } } } }
            }
        }),
        ("POST", "/api/v1/tokens") => json!({
            "operationId": "createToken",
            "summary": "Create a management API token, stored as its SHA-256; the token is returned only here",
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object",
                "required": ["name", "scopes"],
                "additionalProperties": false,
                "properties": {
                    "name": { "type": "string", "pattern": "^[a-z0-9_-]{1,64}$" },
                    "scopes": { "type": "array", "minItems": 1, "items": { "type": "string", "enum": ["read", "write", "admin"] } }
                }
            } } } },
            "responses": {
                "201": { "description": "The token (shown once)", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["name", "scopes", "token", "source", "created_at_ms", "created_by"],
                    "properties": {
                        "name": { "type": "string" },
                        "scopes": { "type": "array", "items": { "type": "string" } },
                        "token": { "type": "string", "description": "64 hex digits; not stored, not shown again" },
                        "source": { "type": "string", "enum": ["api"] },
                        "created_at_ms": { "type": "integer", "format": "int64" },
                        "created_by": { "type": "string" }
                    }
                } } } },
                "400": error_response("Malformed JSON"),
                "409": error_response("A token of that name exists (`already_exists`, field `name`)"),
                "413": error_response("Body too large"),
                "422": error_response("Invalid name or scopes, unknown field or wrong type (`field` names it)")
            }
        }),
        ("DELETE", "/api/v1/tokens/{name}") => json!({
            "operationId": "revokeToken",
            "summary": "Revoke a token created through the API; it grants nothing from this request on",
            "parameters": [path_param("name", "The token's name", json!({ "type": "string" }))],
            "responses": {
                "204": { "description": "Revoked" },
                "404": error_response("No such token"),
                "409": error_response("The token is declared in the configuration file (`config_token`)")
            }
        }),
        ("GET", "/api/v1/devices/{id}/readings") => json!({
            "operationId": "streamDeviceReadings",
            "summary": "The device's readings as they are committed, as Server-Sent Events (`reading` events with JSON data; `lagged` when the viewer fell behind)",
            "parameters": [id],
            "responses": {
                "200": { "description": "An event stream that ends when the daemon stops", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                "404": error_response("No such device"),
                "406": error_response("The request does not accept `text/event-stream`"),
                "503": error_response("No readings stream in this build of the API")
            }
        }),
        ("GET", "/api/v1/alerts") => json!({
            "operationId": "listAlerts",
            "summary": "Alerts raised now by `[[edge.rules]]` alert rules, by rule then device (docs/EDGE.md)",
            "responses": {
                "200": { "description": "The active alerts", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["alerts"],
                    "properties": { "alerts": { "type": "array", "items": { "type": "object",
                        "required": ["rule", "device", "severity", "topic", "raised_at_ms", "reading"],
                        "properties": {
                            "rule": { "type": "string" },
                            "device": { "type": "string" },
                            "severity": { "type": "string" },
                            "topic": { "type": "string", "description": "Topic of the reading that raised it" },
                            "raised_at_ms": { "type": "integer", "format": "int64" },
                            "reading": { "type": "object", "description": "The fields of the reading that raised it" }
                        } } } }
                } } } },
                "409": error_response("The API runs without edge rules (tests only)")
            }
        }),
        ("POST", "/api/v1/edge/test") => json!({
            "operationId": "testEdgeRules",
            "summary": "Dry run: what the edge rules in force would do to a sample reading (nothing is stored, no window or alert changes)",
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object",
                "required": ["device", "topic", "payload"],
                "properties": {
                    "device": { "type": "string", "description": "Its registry facts are used when it is registered" },
                    "topic": { "type": "string" },
                    "payload": { "description": "Any JSON value; sent as its text when `content_type` is not JSON" },
                    "source": { "type": "string", "enum": ["mqtt", "coap", "http", "driver"], "default": "mqtt" },
                    "content_type": { "type": "string", "default": "application/json" }
                }
            } } } },
            "responses": {
                "200": { "description": "The verdict, the payload and headers as they would be stored, and each matching rule's trace", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["verdict", "payload", "headers", "rules"],
                    "properties": {
                        "verdict": { "type": "string", "enum": ["stored", "refused", "dead_letter"] },
                        "refused": { "type": "object", "properties": { "rule": { "type": "string" }, "error": { "type": "string" } } },
                        "dead_letter": { "type": "object", "nullable": true, "properties": { "rule": { "type": "string" }, "error": { "type": "string" } } },
                        "payload": { "description": "As it would be stored (`null` when refused)" },
                        "headers": { "type": "object", "additionalProperties": { "type": "string" } },
                        "rules": { "type": "array", "items": { "type": "object", "required": ["rule", "skipped", "transformed"], "properties": {
                            "rule": { "type": "string" },
                            "skipped": { "type": "boolean", "description": "`when` was false or failed" },
                            "error": { "type": "string" },
                            "invalid": { "type": "string" },
                            "transformed": { "type": "boolean" },
                            "enriched": { "type": "array", "items": { "type": "string" } },
                            "aggregated": { "type": "array", "items": { "type": "array" } },
                            "alert": { "type": "object", "properties": { "raise": { "type": "boolean" }, "clear": { "type": "boolean" } } }
                        } } }
                    }
                } } } },
                "400": error_response("Malformed JSON"),
                "409": error_response("The API runs without edge rules (tests only)"),
                "413": error_response("Body too large"),
                "422": error_response("Unknown field, wrong type or unknown `source` (`field` names it)")
            }
        }),
        ("GET", "/api/v1/edge/rules") => json!({
            "operationId": "listEdgeRules",
            "summary": "The edge rules in force, in the order they apply: the configuration file's, then those created through the API (`origin`)",
            "responses": {
                "200": { "description": "The rules", "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["rules"],
                    "properties": { "rules": { "type": "array", "items": { "$ref": "#/components/schemas/EdgeRule" } } }
                } } } },
                "409": error_response("The API runs without edge rules (tests only)")
            }
        }),
        ("PUT", "/api/v1/edge/rules/{name}") => json!({
            "operationId": "putEdgeRule",
            "summary": "Create or replace an edge rule (kept in the data directory, in force from the next reading). Rules of the configuration file cannot be changed here",
            "parameters": [path_param("name", "The rule's name: 1 to 64 of a-z, 0-9, _, -", json!({ "type": "string" }))],
            "requestBody": json_body("EdgeRule"),
            "responses": {
                "200": json_response("Replaced", "EdgeRule"),
                "201": json_response("Created", "EdgeRule"),
                "400": error_response("Malformed JSON"),
                "409": error_response("A rule of the configuration file has this name (`rule_in_config`)"),
                "413": error_response("Body too large"),
                "422": error_response("Invalid rule: unknown key, wrong type, an expression that does not compile, an invalid schema (`field` names the key under the rule)"),
                "503": error_response("The rules file could not be written; nothing changed")
            }
        }),
        ("DELETE", "/api/v1/edge/rules/{name}") => json!({
            "operationId": "deleteEdgeRule",
            "summary": "Delete an edge rule created through the API",
            "parameters": [path_param("name", "The rule's name", json!({ "type": "string" }))],
            "responses": {
                "204": { "description": "Deleted; no longer applied from the next reading" },
                "404": error_response("No rule of that name was created through the API"),
                "409": error_response("A rule of the configuration file has this name (`rule_in_config`)"),
                "503": error_response("The rules file could not be written; nothing changed")
            }
        }),
        ("GET", "/api/v1/config/check") => json!({
            "operationId": "checkConfig",
            "summary": "What `outpost check-config` says about the configuration file the daemon runs from, read now (its problems and warnings with key paths; never its content)",
            "responses": { "200": { "description": "The check", "content": { "application/json": { "schema": {
                "type": "object",
                "required": ["file", "ok", "problems", "warnings"],
                "properties": {
                    "file": { "type": "string", "nullable": true, "description": "`null`: no file, the built-in defaults" },
                    "ok": { "type": "boolean" },
                    "problems": { "type": "array", "items": { "type": "object", "properties": { "path": { "type": "string" }, "message": { "type": "string" } } } },
                    "warnings": { "type": "array", "items": { "type": "object", "properties": { "path": { "type": "string" }, "message": { "type": "string" } } } },
                    "error": { "type": "string", "nullable": true }
                }
            } } } } }
        }),
        ("POST", "/api/v1/session") => json!({
            "operationId": "openSession",
            "summary": "Sign in to the web console: trade an API token for a session cookie (`outpost_session`, HttpOnly, SameSite=Strict, Secure over HTTPS); state-changing requests with the cookie need `X-CSRF-Token`",
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object",
                "required": ["token"],
                "additionalProperties": false,
                "properties": { "token": { "type": "string" } }
            } } } },
            "responses": {
                "201": json_response("Signed in; the cookie is set", "Session"),
                "400": error_response("Malformed JSON"),
                "401": error_response("The token is not accepted"),
                "413": error_response("Body too large"),
                "422": error_response("Missing `token`, unknown field or wrong type (`field` names it)")
            }
        }),
        ("GET", "/api/v1/session") => json!({
            "operationId": "getSession",
            "summary": "Who is signed in, with the session's CSRF token (`null` when authenticated by a bearer token)",
            "responses": { "200": json_response("The session", "Session") }
        }),
        ("DELETE", "/api/v1/session") => json!({
            "operationId": "closeSession",
            "summary": "Sign out: the session ends and its cookie is cleared",
            "responses": { "204": { "description": "Signed out" } }
        }),
        ("GET", "/api/v1/openapi.json") => json!({
            "operationId": "getOpenApi",
            "summary": "This document",
            "responses": { "200": { "description": "OpenAPI 3.0 document", "content": { "application/json": {} } } }
        }),
        _ => return None,
    };
    Some(op)
}

/// Routes served by other parts of the admin listener (ingestion, gateway status).
fn other_operations() -> Vec<(&'static str, &'static str, Value)> {
    let device_security = json!([{ "deviceBasic": [] }, { "deviceBearer": [] }]);
    vec![
        (
            "POST",
            "/api/v1/ingest/{topic}",
            json!({
                "operationId": "ingest",
                "summary": "A device posts readings (one record or a batch); answered only after the outbox commit",
                "description": "`topic` may contain `/`. The device authenticates with HTTP Basic (device id and secret) or `Authorization: Bearer <device id>:<secret>`. The records carry the authenticated device id.",
                "security": device_security,
                "parameters": [path_param("topic", "Topic, may contain '/'", json!({ "type": "string" }))],
                "requestBody": {
                    "required": true,
                    "content": {
                        "application/json": { "schema": {} },
                        "application/cbor": { "schema": { "type": "string", "format": "binary" } },
                        "application/senml+json": { "schema": { "type": "array", "items": { "type": "object" } } },
                        "application/octet-stream": { "schema": { "type": "string", "format": "binary" } }
                    }
                },
                "responses": {
                    "201": { "description": "Committed to the outbox", "content": { "application/json": {} } },
                    "400": error_response("Bad body (`field` names the offending part)"),
                    "401": error_response("Missing or wrong device credentials"),
                    "403": error_response("Device disabled or not allowed to use HTTP"),
                    "413": error_response("Body or batch too large"),
                    "415": error_response("Unsupported content type"),
                    "503": {
                        "description": "The outbox refuses records (full); retry later",
                        "headers": { "Retry-After": { "schema": { "type": "integer" }, "description": "Seconds" } },
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
                    }
                }
            }),
        ),
        (
            "GET",
            "/api/v1/device/commands",
            json!({
                "operationId": "pollCommands",
                "summary": "A device fetches its queued commands; they are marked delivered",
                "security": device_security,
                "responses": {
                    "200": json_response("The commands, oldest first", "CommandList"),
                    "401": error_response("Missing or wrong device credentials"),
                    "403": error_response("Device disabled or not allowed to use HTTP")
                }
            }),
        ),
        (
            "POST",
            "/api/v1/device/commands/{id}/ack",
            json!({
                "operationId": "ackCommand",
                "summary": "A device acknowledges one of its commands with a result (any JSON body)",
                "security": device_security,
                "parameters": [path_param("id", "Command id (`id` of the polled command)", json!({ "type": "integer", "format": "int64" }))],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {} } } },
                "responses": {
                    "200": { "description": "Acknowledged (or already)", "content": { "application/json": { "schema": { "type": "object", "properties": { "command": { "$ref": "#/components/schemas/Command" } } } } } },
                    "400": error_response("Bad id or body (`field` names it)"),
                    "401": error_response("Missing or wrong device credentials"),
                    "403": error_response("Device disabled or not allowed to use HTTP"),
                    "404": error_response("The device has no such command"),
                    "409": error_response("The command expired before it was delivered"),
                    "413": error_response("Result larger than 64 KiB")
                }
            }),
        ),
        (
            "GET",
            "/api/v1/status",
            json!({
                "operationId": "gatewayStatus",
                "summary": "Gateway status: every subsystem ACTIVE/INACTIVE with a reason, alarms, outbox figures, build info",
                "security": [],
                "responses": { "200": { "description": "Status", "content": { "application/json": {} } } }
            }),
        ),
        (
            "GET",
            "/api/v1/status/history",
            json!({
                "operationId": "gatewayHistory",
                "summary": "The last hour, every 10 s: records appended and forwarded since start, the outbox backlog and resident memory (the web console's charts; same access as the status)",
                "security": [],
                "responses": { "200": { "description": "`{interval_seconds, samples: [{at_ms, appended, forwarded, backlog, rss_bytes}]}`, oldest first", "content": { "application/json": {} } } }
            }),
        ),
        (
            "GET",
            "/healthz",
            json!({
                "operationId": "healthz",
                "summary": "Liveness: the process answers",
                "security": [],
                "responses": { "200": { "description": "Alive", "content": { "text/plain": {} } } }
            }),
        ),
        (
            "GET",
            "/readyz",
            json!({
                "operationId": "readyz",
                "summary": "Readiness: every essential subsystem is active",
                "security": [],
                "responses": {
                    "200": { "description": "Ready", "content": { "application/json": {} } },
                    "503": { "description": "Not ready, with the inactive subsystems", "content": { "application/json": {} } }
                }
            }),
        ),
        (
            "GET",
            "/metrics",
            json!({
                "operationId": "metrics",
                "summary": "Prometheus / OpenMetrics exposition",
                "security": [],
                "responses": { "200": { "description": "Metrics", "content": { "application/openmetrics-text": {} } } }
            }),
        ),
    ]
}

fn schemas() -> Value {
    let text = |max: u32| json!({ "type": "string", "maxLength": max });
    let protocols = json!({ "type": "array", "items": { "type": "string", "enum": ["mqtt", "coap", "http"] }, "uniqueItems": true });
    let tags = json!({ "type": "array", "maxItems": crate::registry::MAX_TAGS, "items": { "type": "string", "pattern": "^[A-Za-z0-9._:=/-]{1,64}$" } });
    let nullable_int = json!({ "type": "integer", "format": "int64", "nullable": true });
    let acl = |which: &str| {
        json!({
            "type": "array",
            "nullable": true,
            "maxItems": crate::registry::MAX_ACL_PATTERNS,
            "items": { "type": "string", "minLength": 1, "maxLength": crate::registry::MAX_ACL_PATTERN_LEN },
            "description": format!("MQTT topic filters (`+`, `#`; `{{id}}` as a whole level is the device id) this device may {which}, replacing `[mqtt.acl]` `{which}` for it; null: the global list. Applies from the device's next CONNECT. A bad pattern: 422 naming e.g. `mqtt_{which}[1]`."),
        })
    };
    json!({
        "Session": {
            "type": "object",
            "required": ["name", "scope", "csrf"],
            "properties": {
                "name": { "type": "string", "description": "The token's name" },
                "scope": { "type": "string", "enum": ["read", "write", "admin"] },
                "csrf": { "type": "string", "nullable": true, "description": "Send as `X-CSRF-Token` with every state-changing request that the cookie authenticates" }
            }
        },
        "ApiToken": {
            "type": "object",
            "required": ["name", "scope", "source"],
            "properties": {
                "name": { "type": "string" },
                "scope": { "type": "string", "enum": ["read", "write", "admin"], "description": "The highest scope (each implies the lower ones)" },
                "source": { "type": "string", "enum": ["config", "api"] },
                "created_at_ms": { "type": "integer", "format": "int64", "description": "Tokens created through the API only" },
                "created_by": { "type": "string", "description": "Tokens created through the API only: the creating token's name, or `local:uid=<uid>`" }
            }
        },
        "Error": {
            "type": "object",
            "required": ["error", "message", "field"],
            "properties": {
                "error": { "type": "string", "description": "Machine-readable code: malformed_json, bad_request, unknown_field, invalid_type, missing_field, invalid_value, unauthorized, forbidden, not_found, already_exists, command_queue_full, body_too_large, apps_disabled, declared_in_config, engine_unavailable, no_zigbee_driver, zigbee_unavailable, zigbee_refused, no_outbox, outbox_unavailable, internal" },
                "message": { "type": "string" },
                "field": { "type": "string", "nullable": true, "description": "JSON path of the offending field, e.g. `tags[1]`" }
            }
        },
        "Device": {
            "type": "object",
            "properties": {
                "id": { "type": "string" },
                "name": { "type": "string" },
                "model": { "type": "string" },
                "batch": { "type": "string", "description": "Serial or batch number" },
                "firmware": { "type": "string" },
                "location": { "type": "string" },
                "tags": tags,
                "enabled": { "type": "boolean" },
                "protocols": protocols,
                "has_secret": { "type": "boolean" },
                "source": { "type": "string", "description": "`api` or `driver:<name>`" },
                "mqtt_publish": acl("publish"),
                "mqtt_subscribe": acl("subscribe"),
                "created_at_ms": { "type": "integer", "format": "int64" },
                "updated_at_ms": { "type": "integer", "format": "int64" },
                "state": { "type": "string", "enum": ["online", "offline", "disabled"] },
                "last_seen_ms": nullable_int
            }
        },
        "NewDevice": {
            "type": "object",
            "additionalProperties": false,
            "required": ["id"],
            "properties": {
                "id": { "type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$" },
                "name": text(256),
                "model": text(128),
                "batch": text(128),
                "firmware": text(128),
                "location": text(256),
                "tags": tags,
                "enabled": { "type": "boolean", "default": true },
                "protocols": protocols,
                "mqtt_publish": acl("publish"),
                "mqtt_subscribe": acl("subscribe")
            }
        },
        "DeviceChanges": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "name": text(256),
                "model": text(128),
                "batch": text(128),
                "firmware": text(128),
                "location": text(256),
                "tags": tags,
                "enabled": { "type": "boolean" },
                "protocols": protocols,
                "mqtt_publish": acl("publish"),
                "mqtt_subscribe": acl("subscribe")
            }
        },
        "DeviceWithSecret": {
            "type": "object",
            "required": ["device", "secret"],
            "properties": {
                "device": { "$ref": "#/components/schemas/Device" },
                "secret": { "type": "string", "description": "64 hex digits; shown only in this response" }
            }
        },
        "DevicePage": {
            "type": "object",
            "required": ["devices", "next_cursor"],
            "properties": {
                "devices": { "type": "array", "items": { "$ref": "#/components/schemas/Device" } },
                "next_cursor": { "type": "string", "nullable": true, "description": "null on the last page" }
            }
        },
        "DeviceStatus": {
            "type": "object",
            "properties": {
                "id": { "type": "string" },
                "state": { "type": "string", "enum": ["online", "offline", "disabled"] },
                "enabled": { "type": "boolean" },
                "last_seen_ms": nullable_int,
                "last_seen_age_seconds": { "type": "number", "nullable": true },
                "messages": { "type": "integer" },
                "bytes": { "type": "integer" },
                "errors": {
                    "type": "object",
                    "properties": {
                        "malformed": { "type": "integer" },
                        "refused": { "type": "integer" },
                        "dropped": { "type": "integer" }
                    }
                },
                "messages_per_minute": { "type": "number", "description": "Exponentially decayed, 60 s time constant" },
                "errors_per_minute": { "type": "number", "description": "Malformed + refused + dropped; exponentially decayed, 60 s time constant" },
                "signal": {
                    "type": "object", "nullable": true,
                    "properties": { "rssi_dbm": { "type": "number" }, "at_ms": { "type": "integer", "format": "int64" } }
                },
                "location": {
                    "type": "object", "nullable": true,
                    "properties": { "lat": { "type": "number" }, "lon": { "type": "number" }, "at_ms": { "type": "integer", "format": "int64" } }
                },
                "offline_after_seconds": { "type": "integer" },
                "offline_reason": { "type": "string", "description": "Set while a driver reports the device unreachable (port gone, Modbus slave not answering)" }
            }
        },
        "NewCommand": {
            "type": "object",
            "additionalProperties": false,
            "required": ["payload"],
            "properties": {
                "payload": { "description": "Any JSON value, at most 64 KiB" },
                "ttl": { "type": "string", "example": "10m", "description": "Default 24h, at most 30d" }
            }
        },
        "Command": {
            "type": "object",
            "properties": {
                "id": { "type": "integer", "format": "int64" },
                "device_id": { "type": "string" },
                "command_id": { "type": "string", "description": "The backend's id (commands from Kafka only)" },
                "name": { "type": "string", "description": "The command's name (commands from Kafka only)" },
                "payload": { "description": "JSON arguments; null when `payload_base64` is set" },
                "payload_base64": { "type": "string", "description": "Bytes arguments, base64 (commands from Kafka only)" },
                "state": { "type": "string", "enum": ["queued", "delivered", "acked", "expired"] },
                "created_at_ms": { "type": "integer", "format": "int64" },
                "expires_at_ms": { "type": "integer", "format": "int64" },
                "delivered_at_ms": nullable_int,
                "acked_at_ms": { "type": "integer", "format": "int64" },
                "result": { "description": "What the device acknowledged with" }
            }
        },
        "CommandList": {
            "type": "object",
            "properties": { "commands": { "type": "array", "items": { "$ref": "#/components/schemas/Command" } } }
        },
        "PermitJoin": {
            "type": "object",
            "required": ["duration"],
            "additionalProperties": false,
            "properties": {
                "duration": {
                    "oneOf": [
                        { "type": "string", "example": "60s", "description": "A duration, 1s to 254s" },
                        { "type": "integer", "minimum": 1, "maximum": 254, "description": "Seconds" }
                    ]
                }
            }
        },
        "PermitJoinGranted": {
            "type": "object",
            "properties": {
                "duration": { "type": "string", "example": "60s" },
                "seconds": { "type": "integer", "description": "Capped by the driver's `permit_join_max`" }
            }
        },
        "AppSpec": {
            "type": "object",
            "required": ["name", "image"],
            "additionalProperties": false,
            "description": "Same keys as [[apps.app]] in the configuration",
            "properties": {
                "name": { "type": "string", "pattern": "^[a-z0-9_-]{1,64}$" },
                "image": { "type": "string" },
                "command": { "type": "array", "items": { "type": "string" } },
                "env": { "type": "array", "items": { "type": "string", "example": "LOG_LEVEL=info" } },
                "mounts": { "type": "array", "items": { "type": "string", "example": "/var/lib/outpost/apps/x:/data:ro" } },
                "ports": { "type": "array", "items": { "type": "string", "example": "8081:80/tcp" } },
                "memory": { "type": "string", "example": "64MiB" },
                "cpus": { "type": "number", "minimum": 0.01, "maximum": 256 },
                "restart": { "type": "string", "enum": ["always", "on-failure", "never"] },
                "max_retries": { "type": "integer", "minimum": 0, "maximum": 1000 }
            }
        },
        "App": {
            "type": "object",
            "properties": {
                "name": { "type": "string" },
                "source": { "type": "string", "enum": ["config", "api"] },
                "spec": { "$ref": "#/components/schemas/AppSpec" },
                "status": {
                    "type": "object",
                    "properties": {
                        "state": { "type": "string", "enum": ["ACTIVE", "INACTIVE", "FAILED"] },
                        "reason": { "type": "string" },
                        "container_id": { "type": "string" },
                        "started_at": { "type": "string" },
                        "restart_count": { "type": "integer" },
                        "last_exit_code": { "type": "integer" },
                        "health": { "type": "string" }
                    }
                }
            }
        },
        "DeadLetter": {
            "type": "object",
            "description": "A record Kafka refused for good (docs/KAFKA.md, \"Poison records\"); the payload is not listed, its size is",
            "required": ["seq", "device_id", "source", "topic", "route", "received_at_ms", "content_type", "size", "reason", "error", "kafka_topic", "attempts", "dead_at_ms"],
            "properties": {
                "seq": { "type": "integer", "format": "int64", "description": "The record's outbox sequence (`outpost-seq`), kept when it is retried" },
                "device_id": { "type": "string" },
                "source": { "type": "string", "enum": ["mqtt", "coap", "http", "driver"] },
                "topic": { "type": "string", "description": "The device's topic" },
                "route": { "type": "string" },
                "received_at_ms": { "type": "integer", "format": "int64" },
                "content_type": { "type": "string", "nullable": true },
                "size": { "type": "integer", "format": "int64", "description": "Bytes counted against outbox.max_bytes" },
                "reason": { "type": "string", "enum": ["too_large", "invalid_record", "topic_authorization", "invalid_topic", "unknown_topic", "attempts"] },
                "error": { "type": "string", "description": "The last error, as Kafka's client reported it" },
                "kafka_topic": { "type": "string", "description": "The Kafka topic the forwarder tried" },
                "attempts": { "type": "integer" },
                "dead_at_ms": { "type": "integer", "format": "int64" }
            }
        },
        "EdgeRule": {
            "type": "object",
            "description": "The keys of an `[[edge.rules]]` table (docs/EDGE.md, config/examples/outpost.toml): TOML tables as JSON objects, durations as strings such as \"1m\"",
            "properties": {
                "name": { "type": "string" },
                "topic": { "type": "string" },
                "device": { "type": "string" },
                "source": { "type": "string", "enum": ["mqtt", "coap", "http", "driver"] },
                "when": { "type": "string", "description": "CEL condition" },
                "schema": { "type": "object", "description": "JSON Schema" },
                "schema_file": { "type": "string" },
                "on_invalid": { "type": "string", "enum": ["refuse", "dead_letter"] },
                "rename": { "type": "object", "additionalProperties": { "type": "string" } },
                "drop": { "type": "array", "items": { "type": "string" } },
                "set": { "type": "object", "additionalProperties": { "type": "string" }, "description": "field → CEL expression" },
                "enrich": { "type": "array", "items": { "type": "string", "enum": ["name", "model", "location", "tags", "firmware"] } },
                "enrich_into": { "type": "string", "enum": ["headers", "payload"] },
                "aggregate": { "type": "object" },
                "alert": { "type": "object" },
                "origin": { "type": "string", "enum": ["config", "api"], "description": "In listings: where the rule comes from" }
            }
        },
        "DeadLetterPage": {
            "type": "object",
            "required": ["dead_letters", "total", "bytes", "next_after"],
            "properties": {
                "dead_letters": { "type": "array", "items": { "$ref": "#/components/schemas/DeadLetter" } },
                "total": { "type": "integer", "format": "int64", "description": "Dead letters held in all (not just this page)" },
                "bytes": { "type": "integer", "format": "int64", "description": "Their bytes" },
                "next_after": { "type": "integer", "format": "int64", "nullable": true, "description": "`after` for the next page; null on the last page" }
            }
        },
        "DeadLetterSelection": {
            "type": "object",
            "additionalProperties": false,
            "description": "Exactly one of `seqs` and `all`",
            "properties": {
                "seqs": { "type": "array", "minItems": 1, "items": { "type": "integer", "format": "int64", "minimum": 0 } },
                "all": { "type": "boolean", "enum": [true], "description": "Every dead letter" }
            }
        },
        "AppList": {
            "type": "object",
            "properties": {
                "engine_problem": { "type": "string", "nullable": true, "description": "Why the container engine is unreachable; null while it answers" },
                "items": { "type": "array", "items": { "$ref": "#/components/schemas/App" } }
            }
        }
    })
}

/// Builds the document.
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    let mut add = |method: &str, path: &str, op: Value| {
        let entry = paths
            .entry(path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(methods) = entry {
            methods.insert(method.to_ascii_lowercase(), op);
        }
    };
    for spec in ROUTES {
        let Some(mut op) = management_operation(spec.method, spec.path) else {
            continue; // the test `every_route_is_documented` catches this
        };
        if let Value::Object(fields) = &mut op {
            match spec.scope {
                Some(scope) => {
                    let name = scope_name(scope);
                    // OpenAPI 3.0 allows scope lists only for OAuth2/OpenID schemes: the scope
                    // goes into an extension and the summary instead.
                    fields.insert("security".into(), json!([{ "bearerAuth": [] }]));
                    if let Some(Value::String(summary)) = fields.get_mut("summary") {
                        summary.push_str(&format!(" (scope: {name})"));
                    }
                    fields.insert("x-required-scope".into(), Value::String(name.to_owned()));
                    if let Some(Value::Object(responses)) = fields.get_mut("responses") {
                        responses.insert(
                            "401".into(),
                            error_response(
                                "Missing or invalid bearer token (with `WWW-Authenticate: Bearer`)",
                            ),
                        );
                        responses.insert(
                            "403".into(),
                            error_response(&format!("The token lacks the `{name}` scope")),
                        );
                        if scope >= Scope::Write {
                            responses.entry("500").or_insert_with(|| {
                                error_response("Storage failed; nothing took effect")
                            });
                        }
                    }
                }
                None => {
                    fields.insert("security".into(), json!([]));
                }
            }
        }
        add(spec.method, spec.path, op);
    }
    for (method, path, op) in other_operations() {
        add(method, path, op);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Outpost gateway API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Management API of an Outpost edge gateway. Management routes take `Authorization: Bearer <token>` with a token declared in `[[api.tokens]]` or created through `/api/v1/tokens` (over the gateway's local admin socket no token is needed); scopes: `read` for GETs, `write` to create/update/enable/disable devices, queue commands and retry dead letters, `admin` to delete devices, rotate secrets and drop dead letters (`admin` implies `write` implies `read`). Errors are JSON `{\"error\", \"message\", \"field\"}`."
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearerAuth": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": { "type": "http", "scheme": "bearer", "description": "Management token from `[[api.tokens]]` (`outpost token new`) or `POST /api/v1/tokens` (`outpost token create`)" },
                "deviceBasic": { "type": "http", "scheme": "basic", "description": "Device id and device secret" },
                "deviceBearer": { "type": "http", "scheme": "bearer", "description": "`<device id>:<device secret>`" }
            },
            "schemas": schemas()
        }
    })
}

/// Every (method, path) in the document.
#[cfg(test)]
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, methods) in paths {
            if let Some(methods) = methods.as_object() {
                for method in methods.keys() {
                    out.push((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
    }
    out.sort();
    out
}

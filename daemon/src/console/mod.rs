//! The web console at `/` on the admin listener: three static files compiled into the binary
//! (no CDN, no JavaScript build step), a single-page app over the management API. It signs in
//! with an API token traded for a session cookie (`api::session`); what it may do is what that
//! token may do. docs/CONSOLE.md describes it.
//!
//! Every answer carries a Content-Security-Policy that allows only this origin's own script,
//! style and connections (no inline script, no framing), `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`; the files are small enough (about 33 KB) to be revalidated on
//! every load (`Cache-Control: no-cache`, with an ETag per build).

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// The console's routes: (method, path), for the admin listener's 405 answers.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/console/app.js"),
    ("GET", "/console/app.css"),
];

/// The policy every console answer carries.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Changes with every build of the files (their length and a cheap hash), so a browser's cached
/// copy is replaced after an upgrade.
fn etag(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{:x}-{hash:016x}\"", body.len())
}

fn asset(request: &HeaderMap, body: &'static str, content_type: &'static str) -> Response {
    let tag = etag(body);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(tag) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, tag);
    }
    response
}

/// The console's router (stateless); merge it into the admin router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            ROUTES[0].1,
            get(|h: HeaderMap| async move { asset(&h, INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            ROUTES[1].1,
            get(|h: HeaderMap| async move { asset(&h, SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            ROUTES[2].1,
            get(|h: HeaderMap| async move { asset(&h, STYLE, "text/css; charset=utf-8") }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn the_files_are_served_with_their_policy_and_revalidated() {
        let app: Router = router();
        let mut total = 0;
        for (_, path) in ROUTES {
            let response = app
                .clone()
                .oneshot(
                    axum::http::Request::get(*path)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let headers = response.headers().clone();
            assert!(
                headers[header::CONTENT_SECURITY_POLICY]
                    .to_str()
                    .unwrap()
                    .contains("script-src 'self'")
            );
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            total += body.len();
            let again = app
                .clone()
                .oneshot(
                    axum::http::Request::get(*path)
                        .header(header::IF_NONE_MATCH, headers[header::ETAG].clone())
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        }
        // The budget for the whole console: 300 KB.
        assert!(total < 300 * 1000, "{total} bytes");
        // No resource from elsewhere: every script and style is this origin's.
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
    }
}

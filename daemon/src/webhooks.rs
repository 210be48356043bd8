//! Webhook calls of edge alerts (`[edge.rules.alert.webhook]`): stored in `webhooks.db` before
//! the first attempt, POSTed by the task `edge-webhooks`, retried with backoff until delivered,
//! refused for good, or older than the rule's `max_age` — so a restart or a crash never loses a
//! pending call (at least once: a call delivered just before a crash is made again).
//!
//! A 2xx answer delivers the call. 408, 429 and 5xx, a timeout or a connection error retry it
//! after 1 s doubling to 5 min. Any other answer (a 4xx: the receiver refuses this document) drops
//! it with a warning. At most [`MAX_PENDING`] calls wait; beyond, new ones are dropped (counted).
//! `https://` URLs are checked against the system's CA bundle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outpost_edge::WebhookCall;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use rusqlite::{Connection, params};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Calls waiting at most.
pub const MAX_PENDING: i64 = 10_000;
/// Calls attempted per pass.
const BATCH: i64 = 16;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The pending calls and the task that makes them. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    db: Arc<Mutex<Connection>>,
    wake: Arc<Notify>,
    metrics: WebhookMetrics,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

/// `outpost_edge_webhook_*`.
#[derive(Debug, Clone, Default)]
pub struct WebhookMetrics {
    pub pending: Gauge,
    pub delivered: Counter,
    pub retries: Counter,
    pub dropped: Counter,
}

impl WebhookMetrics {
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let r = registry.sub_registry_with_prefix("outpost_edge_webhook");
        r.register(
            "pending",
            "Webhook calls waiting to be made (in webhooks.db)",
            self.pending.clone(),
        );
        r.register(
            "delivered",
            "Webhook calls answered with 2xx",
            self.delivered.clone(),
        );
        r.register(
            "retries",
            "Webhook attempts that failed and will be retried",
            self.retries.clone(),
        );
        r.register(
            "dropped",
            "Webhook calls given up: refused (4xx), too old, or over the pending limit",
            self.dropped.clone(),
        );
    }
}

/// One stored call.
#[derive(Debug)]
struct Pending {
    id: i64,
    rule: String,
    url: String,
    body: Vec<u8>,
    attempts: u32,
    timeout: Duration,
    expires_ms: i64,
}

/// How one attempt went.
enum Outcome {
    Delivered,
    Retry(String),
    Refused(String),
}

impl Webhooks {
    /// Opens (or creates) `webhooks.db` in `data_dir`.
    pub fn open(data_dir: &Path, metrics: WebhookMetrics) -> anyhow::Result<Self> {
        let path: PathBuf = data_dir.join("webhooks.db");
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS calls (
                 id INTEGER PRIMARY KEY,
                 rule TEXT NOT NULL,
                 url TEXT NOT NULL,
                 body BLOB NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 timeout_ms INTEGER NOT NULL,
                 next_at_ms INTEGER NOT NULL,
                 expires_ms INTEGER NOT NULL
             );",
        )?;
        let pending: i64 = conn.query_row("SELECT count(*) FROM calls", [], |r| r.get(0))?;
        metrics.pending.set(pending);
        let mut agent = ureq::Agent::config_builder().http_status_as_error(false);
        match crate::https::pem_roots(Path::new(crate::https::SYSTEM_CA_BUNDLE)) {
            Ok(roots) => {
                agent = agent.tls_config(
                    ureq::tls::TlsConfig::builder()
                        .unversioned_rustls_crypto_provider(Arc::new(
                            tokio_rustls::rustls::crypto::ring::default_provider(),
                        ))
                        .root_certs(roots)
                        .build(),
                );
            }
            Err(why) => tracing::debug!(error = %why, "No CA bundle: https:// webhooks will fail"),
        }
        Ok(Self {
            db: Arc::new(Mutex::new(conn)),
            wake: Arc::new(Notify::new()),
            metrics,
            agent: agent.build().into(),
        })
    }

    /// Stores `calls` (committed when this returns) and wakes the task.
    pub async fn enqueue(&self, calls: Vec<WebhookCall>) {
        if calls.is_empty() {
            return;
        }
        let db = Arc::clone(&self.db);
        let result = tokio::task::spawn_blocking(move || -> rusqlite::Result<(usize, usize)> {
            let mut conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction()?;
            let mut pending: i64 = tx.query_row("SELECT count(*) FROM calls", [], |r| r.get(0))?;
            let now = now_ms();
            let (mut stored, mut dropped) = (0, 0);
            for call in calls {
                if pending >= MAX_PENDING {
                    tracing::warn!(rule = %call.rule, url = %call.url, "Webhook call dropped: {MAX_PENDING} calls are already waiting");
                    dropped += 1;
                    continue;
                }
                tx.execute(
                    "INSERT INTO calls (rule, url, body, timeout_ms, next_at_ms, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        call.rule,
                        call.url,
                        call.body,
                        millis(call.timeout),
                        now,
                        now.saturating_add(millis(call.max_age)),
                    ],
                )?;
                pending += 1;
                stored += 1;
            }
            tx.commit()?;
            Ok((stored, dropped))
        })
        .await;
        match result {
            Ok(Ok((stored, dropped))) => {
                self.metrics.pending.inc_by(stored as i64);
                self.metrics.dropped.inc_by(dropped as u64);
                self.wake.notify_one();
            }
            Ok(Err(e)) => tracing::error!(error = %e, "Webhook calls not stored"),
            Err(e) => tracing::error!(error = %e, "Webhook calls not stored"),
        }
    }

    /// Makes the calls as they fall due, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let due = self.due().await;
            if due.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(BACKOFF_MIN) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            for call in due {
                if stop.is_cancelled() {
                    return;
                }
                let outcome = self.attempt(&call).await;
                self.settle(call, outcome).await;
            }
        }
    }

    /// Calls whose time has come, oldest first.
    async fn due(&self) -> Vec<Pending> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<Pending>> {
            let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            let mut stmt = conn.prepare_cached(
                "SELECT id, rule, url, body, attempts, timeout_ms, expires_ms FROM calls
                 WHERE next_at_ms <= ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now_ms(), BATCH], |r| {
                Ok(Pending {
                    id: r.get(0)?,
                    rule: r.get(1)?,
                    url: r.get(2)?,
                    body: r.get(3)?,
                    attempts: r.get(4)?,
                    timeout: Duration::from_millis(u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0)),
                    expires_ms: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
        .unwrap_or_else(|e| Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "Reading webhooks.db failed");
            Vec::new()
        })
    }

    async fn attempt(&self, call: &Pending) -> Outcome {
        let (agent, url, body, timeout) = (
            self.agent.clone(),
            call.url.clone(),
            call.body.clone(),
            call.timeout,
        );
        let result = tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .config()
                .timeout_global(Some(timeout))
                .build()
                .header("Content-Type", "application/json")
                .send(&body[..])
                .map(|r| r.status().as_u16())
        })
        .await;
        match result {
            Ok(Ok(status)) if (200..300).contains(&status) => Outcome::Delivered,
            Ok(Ok(status)) if status == 408 || status == 429 || status >= 500 => {
                Outcome::Retry(format!("HTTP {status}"))
            }
            Ok(Ok(status)) => Outcome::Refused(format!("HTTP {status}")),
            Ok(Err(e)) => Outcome::Retry(e.to_string()),
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// Deletes or reschedules a call after an attempt; the metrics follow once the file says so.
    async fn settle(&self, call: Pending, outcome: Outcome) {
        let now = now_ms();
        let attempts = call.attempts + 1;
        // (the counter to bump, whether the call is done with)
        let (counter, delete) = match &outcome {
            Outcome::Delivered => {
                tracing::info!(rule = %call.rule, url = %call.url, attempts, "Webhook delivered");
                (&self.metrics.delivered, true)
            }
            Outcome::Refused(why) => {
                tracing::warn!(rule = %call.rule, url = %call.url, error = %why, "Webhook refused by the receiver; dropped");
                (&self.metrics.dropped, true)
            }
            Outcome::Retry(why) if now >= call.expires_ms => {
                tracing::warn!(rule = %call.rule, url = %call.url, error = %why, attempts, "Webhook not delivered within its max_age; dropped");
                (&self.metrics.dropped, true)
            }
            Outcome::Retry(why) => {
                tracing::debug!(rule = %call.rule, url = %call.url, error = %why, attempts, "Webhook attempt failed; retrying");
                (&self.metrics.retries, false)
            }
        };
        let next_at = now.saturating_add(millis(outpost_pacing::Backoff::nth(
            BACKOFF_MIN,
            BACKOFF_MAX,
            attempts,
        )));
        let db = Arc::clone(&self.db);
        let id = call.id;
        let written = tokio::task::spawn_blocking(move || {
            let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            if delete {
                conn.execute("DELETE FROM calls WHERE id = ?1", params![id])
            } else {
                conn.execute(
                    "UPDATE calls SET attempts = ?2, next_at_ms = ?3 WHERE id = ?1",
                    params![id, attempts, next_at],
                )
            }
        })
        .await;
        match written {
            Ok(Ok(_)) => {
                if delete {
                    self.metrics.pending.dec();
                }
                counter.inc();
            }
            Ok(Err(e)) => tracing::error!(error = %e, "Updating webhooks.db failed"),
            Err(e) => tracing::error!(error = %e, "Updating webhooks.db failed"),
        }
    }
}

fn now_ms() -> i64 {
    outpost_sync::outbox::now_unix_ms()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver on loopback answering each request with the next status of `statuses`;
    /// returns its address and the bodies it got.
    fn receiver(statuses: Vec<u16>) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&bodies);
        std::thread::spawn(move || {
            for status in statuses {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Headers, then Content-Length bytes of body.
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            seen.lock().unwrap().push(body.to_owned());
                            break;
                        }
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        (addr, bodies)
    }

    fn call(addr: std::net::SocketAddr, body: &str) -> WebhookCall {
        WebhookCall {
            rule: "r".into(),
            url: format!("http://{addr}/hook"),
            body: body.as_bytes().to_vec(),
            timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn calls_are_retried_after_5xx_dropped_after_4xx_or_when_old_capped_and_kept_in_the_file()
    {
        let dir = tempfile::tempdir().unwrap();
        let (addr, bodies) = receiver(vec![503, 200, 404]);
        let hooks = Webhooks::open(dir.path(), WebhookMetrics::default()).unwrap();
        hooks.enqueue(vec![call(addr, "one")]).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(hooks.clone().run(stop.clone()));
        // 503, then 1 s later 200.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hooks.metrics.delivered.get() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(hooks.metrics.delivered.get(), 1);
        assert_eq!(hooks.metrics.retries.get(), 1);
        hooks.enqueue(vec![call(addr, "two")]).await;
        while hooks.metrics.dropped.get() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(hooks.metrics.dropped.get(), 1, "the 404 drops it");
        assert_eq!(*bodies.lock().unwrap(), ["one", "one", "two"]);
        assert_eq!(hooks.metrics.pending.get(), 0);
        stop.cancel();
        task.await.unwrap();

        // Too old: a failed attempt past `max_age` drops the call.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let hooks = Webhooks::open(dir.path(), WebhookMetrics::default()).unwrap();
        let mut late = call(closed, "late");
        late.max_age = Duration::ZERO;
        hooks.enqueue(vec![late]).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(hooks.clone().run(stop.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hooks.metrics.dropped.get() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(hooks.metrics.dropped.get(), 1, "dropped when too old");
        assert_eq!(hooks.metrics.pending.get(), 0);
        stop.cancel();
        task.await.unwrap();

        // Beyond MAX_PENDING waiting calls, new ones are dropped (counted), none stored.
        let full = Webhooks::open(dir.path(), WebhookMetrics::default()).unwrap();
        let many = usize::try_from(MAX_PENDING).unwrap() + 2;
        full.enqueue((0..many).map(|_| call(closed, "x")).collect())
            .await;
        assert_eq!(full.metrics.pending.get(), MAX_PENDING);
        assert_eq!(full.metrics.dropped.get(), 2);
        drop(full);
        std::fs::remove_file(dir.path().join("webhooks.db")).unwrap();
        let _ = std::fs::remove_file(dir.path().join("webhooks.db-wal"));
        let _ = std::fs::remove_file(dir.path().join("webhooks.db-shm"));

        // A call stored while nothing runs is there when the file is opened again.
        let hooks = Webhooks::open(dir.path(), WebhookMetrics::default()).unwrap();
        hooks.enqueue(vec![call(addr, "three")]).await;
        drop(hooks);
        let again = Webhooks::open(dir.path(), WebhookMetrics::default()).unwrap();
        assert_eq!(again.metrics.pending.get(), 1);
    }
}

//! Supervision of restartable internal subsystems: [`supervise`] runs a task built by a
//! factory; if the task panics, or ends while the gateway is not stopping, the subsystem is shown
//! INACTIVE with the reason, its restart count goes up, and after a capped backoff it is built
//! and run again. A task that ends because `stop` was cancelled is not restarted.
//!
//! Test-only fault hook: in debug builds, `OUTPOST_DEBUG_FAIL=<name>[,<name>…]` makes the first
//! run of each named subsystem panic at start, so tests can watch the restart. Release builds
//! ignore the variable.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::status::StatusBoard;

/// First pause before a restart; doubles per consecutive failure.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest pause before a restart.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Whether the debug fault hook asks subsystem `name` to fail once.
pub fn fault_requested(name: &str) -> bool {
    outpost_config::debug_fault_requested(name)
}

/// Runs `make()` until `stop`, restarting it with backoff after a panic or an unexpected end.
/// `essential` is passed to the status board.
pub async fn supervise<F, Fut>(
    name: String,
    essential: bool,
    board: StatusBoard,
    stop: CancellationToken,
    tracker: TaskTracker,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = outpost_pacing::Backoff::new(BACKOFF_START, BACKOFF_MAX);
    let mut inject = fault_requested(&name);
    loop {
        let task = make();
        let started = tokio::time::Instant::now();
        let fail_now = std::mem::take(&mut inject);
        let run = async move {
            if fail_now {
                panic!("fault injected by OUTPOST_DEBUG_FAIL");
            }
            task.await;
        }
        .in_current_span();
        let result = tracker.spawn(run).await;
        if stop.is_cancelled() {
            return;
        }
        let why = match result {
            Ok(()) => "stopped unexpectedly".to_owned(),
            Err(join) if join.is_panic() => {
                let message = join
                    .into_panic()
                    .downcast::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|p| p.downcast::<String>().map(|s| *s))
                    .unwrap_or_else(|_| "unknown panic".to_owned());
                format!("panicked: {message}")
            }
            Err(_) => "was cancelled".to_owned(),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let pause = backoff.failed();
        tracing::error!(
            subsystem = %name,
            reason = %why,
            retry_ms = pause.as_millis() as u64,
            "Subsystem failed; restarting it"
        );
        board.inactive(&name, format!("{why}; restarting"), essential);
        board.restarted(&name);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        board.active(&name, essential);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_counted() {
        let board = StatusBoard::default();
        board.active("x", false);
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let tracker = TaskTracker::new();
        let counter = Arc::clone(&runs);
        let halt = stop.clone();
        let supervisor = tokio::spawn(supervise(
            "x".into(),
            false,
            board.clone(),
            stop.clone(),
            tracker,
            move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let halt = halt.clone();
                async move {
                    if n < 2 {
                        panic!("boom {n}");
                    }
                    halt.cancelled().await;
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let s = board.subsystems().pop().unwrap();
        assert_eq!(s.restarts, 2);
        assert_eq!(s.state, crate::status::State::Active);
        stop.cancel();
        supervisor.await.unwrap();
    }
}

//! How the composition root starts tasks: every one by name into one `TaskTracker` (so shutdown
//! can wait for all of them), the long-running ones under a [`supervisor`].

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::status::StatusBoard;
use crate::supervisor;

/// The tracker every task of the daemon runs in, and the status board supervisors report to.
#[derive(Clone)]
pub struct Spawner {
    pub tracker: TaskTracker,
    pub status: StatusBoard,
}

impl Spawner {
    /// Spawns `task` as the task `name` (every log line it writes says so).
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(named(name.into(), task))
    }

    /// Spawns the task `name` running what `make` builds, under a supervisor that shows it as
    /// the subsystem `subsystem` and builds it again with backoff if it fails or panics, until
    /// `stop`. `essential`: while it is down `/readyz` says so and the watchdog is not fed.
    pub fn supervise<M, Fut>(
        &self,
        name: &str,
        subsystem: &str,
        essential: bool,
        stop: CancellationToken,
        make: M,
    ) -> JoinHandle<()>
    where
        M: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(
            name,
            supervisor::supervise(
                subsystem.into(),
                essential,
                self.status.clone(),
                stop,
                self.tracker.clone(),
                make,
            ),
        )
    }
}

/// Wraps a task in a span carrying its name, so every log line says which task wrote it.
fn named<F: Future>(name: String, task: F) -> impl Future<Output = F::Output> {
    task.instrument(tracing::info_span!("task", task = %name))
}

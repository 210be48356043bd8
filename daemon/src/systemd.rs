//! systemd integration: READY, RELOADING, STATUS, WATCHDOG and STOPPING over `$NOTIFY_SOCKET`.
//!
//! Every call is a no-op when not started by systemd. The watchdog is fed only while the outbox
//! writer proves it is making progress and every essential subsystem on the status board is
//! ACTIVE (outbox, registry, the admin listener carrying HTTP ingestion), so a wedged writer or a
//! dead listener gets the whole daemon restarted.

use std::time::Duration;

use outpost_sync::Outbox;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A configuration reload begins (`RELOADING=1` with the monotonic time, as `Type=notify-reload`
/// wants); [`reloaded`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The reload is over: ready again, with a status line.
pub fn reloaded(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog interval systemd asked for, if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Feeds the watchdog at half its interval while the writer's last sign of progress is younger
/// than half the interval and no essential subsystem is INACTIVE; otherwise stays silent and
/// logs why.
pub async fn watchdog(
    interval: Duration,
    outbox: Outbox,
    board: crate::status::StatusBoard,
    shutdown: CancellationToken,
) {
    let period = interval / 2;
    let mut tick = tokio::time::interval(period);
    let mut starved = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let idle = outbox.writer_idle_for();
        let down = board.not_ready();
        if !down.is_empty() {
            if !starved {
                starved = true;
                let names: Vec<&str> = down.iter().map(|s| s.name.as_str()).collect();
                tracing::error!(
                    subsystems = ?names,
                    "Essential subsystems are down: no longer feeding the systemd watchdog"
                );
            }
        } else if idle < period && !outbox.is_closed() {
            notify(&[NotifyState::Watchdog]);
            starved = false;
        } else if !starved {
            starved = true;
            tracing::error!(
                writer_silent_ms = idle.as_millis() as u64,
                "Outbox writer shows no progress: no longer feeding the systemd watchdog"
            );
        }
    }
}

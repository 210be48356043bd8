//! The serial line driver (`kind = "serial"`): one line-oriented sensor (or a multiplexer of
//! several) on one serial port; each line becomes one reading.
//!
//! State machine: `Closed` → open the port by its configured path → `Open` (read, frame, parse,
//! send) → on an I/O error or EOF back to `Closed`, discarding the partial line, and reopen after
//! a capped exponential backoff. After `reopen.offline_after_failures` consecutive failures
//! (the failure that closed the port and the failed open attempts after it) every device this
//! port has produced readings for is reported offline. Nothing a sensor sends is fatal: bad
//! lines are counted (`frames_bad`), overlong and partial lines dropped (`frames_dropped`), and
//! logged at most once per 10 s with the number since the last line.

pub mod frame;
pub mod parse;

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_config::SerialLineConfig;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::port::{LogLimiter, open_serial, reopen_backoff, sleep_or_stop};
use crate::{
    Driver, DriverContext, DriverError, DriverFuture, JSON, Reading, ReadingSink, now_unix_ms,
};
use frame::{Frame, LineFramer};
pub use parse::{LineError, LineParser, ParsedLine};

/// Period of the rate-limited warnings.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Devices remembered per port for offline reporting; beyond, new ids are not tracked.
const MAX_TRACKED_DEVICES: usize = 1024;

/// See the module docs.
#[derive(Debug)]
pub struct SerialLineDriver {
    config: SerialLineConfig,
    ctx: DriverContext,
}

impl SerialLineDriver {
    pub fn new(config: SerialLineConfig, ctx: DriverContext) -> Self {
        Self { config, ctx }
    }
}

impl Driver for SerialLineDriver {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(self: Box<Self>, sink: ReadingSink, shutdown: CancellationToken) -> DriverFuture {
        let span = tracing::info_span!("serial", driver = %self.config.name,
            path = %self.config.serial.path.display());
        Box::pin(run(*self, sink, shutdown).instrument(span))
    }
}

/// How an open port stopped being read.
enum Closed {
    Shutdown,
    /// The daemon stopped taking readings.
    NoSink,
    Failed(String),
}

async fn run(
    driver: SerialLineDriver,
    sink: ReadingSink,
    shutdown: CancellationToken,
) -> Result<(), DriverError> {
    let SerialLineDriver { config, ctx } = driver;
    let mut state = Session {
        parser: LineParser::new(&config),
        framer: LineFramer::new(usize::try_from(config.max_line_bytes.bytes()).unwrap_or(4096)),
        bad_log: LogLimiter::new(LOG_EVERY),
        devices: BTreeSet::new(),
        config: &config,
        ctx: &ctx,
    };
    let mut backoff = reopen_backoff(&config.reopen);
    let mut open_log = LogLimiter::new(LOG_EVERY);
    let mut opened_before = false;
    let mut reported_offline = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match open_serial(&config.serial) {
            Ok(port) => {
                if opened_before {
                    ctx.stats.reopened();
                    tracing::info!(failures = backoff.failures(), "Serial port reopened");
                } else {
                    tracing::info!("Serial port opened");
                }
                opened_before = true;
                ctx.stats.set_up();
                backoff.reset();
                reported_offline = false;
                match state.read(port, &sink, &shutdown).await {
                    Closed::Shutdown => return Ok(()),
                    Closed::NoSink => return Err(DriverError::SinkClosed),
                    Closed::Failed(error) => {
                        tracing::warn!(error = %error, "Serial port failed; reopening");
                        ctx.stats.set_down(error);
                        if state.framer.reset() {
                            ctx.stats.frame_dropped();
                        }
                    }
                }
            }
            Err(e) => {
                ctx.stats.set_down(e.to_string());
                if let Some(n) = open_log.hit(tokio::time::Instant::now()) {
                    tracing::warn!(error = %e, attempts = n, "Cannot open serial port; retrying");
                }
            }
        }
        let wait = backoff.failed();
        if !reported_offline && backoff.failures() >= config.reopen.offline_after_failures {
            reported_offline = true;
            let reason = format!("serial port {} unavailable", config.serial.path.display());
            for device in &state.devices {
                ctx.health.offline(&config.name, device, &reason);
            }
            tracing::warn!(
                devices = state.devices.len(),
                failures = backoff.failures(),
                "Serial port still unavailable; its devices are reported offline"
            );
        }
        if !sleep_or_stop(wait, &shutdown).await {
            return Ok(());
        }
    }
}

/// What survives reopening the port.
struct Session<'a> {
    parser: LineParser,
    framer: LineFramer,
    bad_log: LogLimiter,
    devices: BTreeSet<String>,
    config: &'a SerialLineConfig,
    ctx: &'a DriverContext,
}

impl Session<'_> {
    async fn read<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        mut port: R,
        sink: &ReadingSink,
        shutdown: &CancellationToken,
    ) -> Closed {
        let mut buf = vec![0u8; 4096];
        let mut batch: Vec<Reading> = Vec::new();
        loop {
            let n = tokio::select! {
                read = port.read(&mut buf) => match read {
                    Ok(0) => return Closed::Failed("port closed (end of file)".into()),
                    Ok(n) => n,
                    Err(e) => return Closed::Failed(e.to_string()),
                },
                () = shutdown.cancelled() => return Closed::Shutdown,
            };
            let received_ms = now_unix_ms();
            self.frames(&buf[..n], received_ms, &mut batch);
            for reading in batch.drain(..) {
                // A full channel makes us wait: the port's kernel buffer absorbs the sensor
                // meanwhile (and overflows there, not in our memory).
                if sink.send(reading).await.is_err() {
                    return Closed::NoSink;
                }
            }
        }
    }

    /// Frames and parses `data`, appending readings to `out`. Synchronous, for tests and benches.
    fn frames(&mut self, data: &[u8], received_ms: i64, out: &mut Vec<Reading>) {
        let Self {
            parser,
            framer,
            bad_log,
            devices,
            config,
            ctx,
        } = self;
        framer.push(data, |frame| match frame {
            Frame::Line(line) => match parser.parse(line, received_ms) {
                Ok(parsed) => {
                    ctx.stats.frame_ok();
                    if devices.len() < MAX_TRACKED_DEVICES && !devices.contains(&parsed.device_id) {
                        devices.insert(parsed.device_id.clone());
                    }
                    out.push(Reading {
                        driver: config.name.clone(),
                        topic: config.topic_for(&parsed.device_id),
                        device_id: parsed.device_id,
                        route: config.route.clone(),
                        content_type: Some(JSON.to_owned()),
                        payload: parsed.payload,
                        received_at_ms: received_ms,
                    });
                }
                Err(error) => {
                    ctx.stats.frame_bad();
                    if let Some(n) = bad_log.hit(tokio::time::Instant::now()) {
                        let sample = String::from_utf8_lossy(&line[..line.len().min(80)]);
                        tracing::warn!(error = %error, bad_lines = n, line = %sample,
                            "Bad serial lines dropped");
                    }
                }
            },
            Frame::Overlong => {
                ctx.stats.frame_dropped();
                if let Some(n) = bad_log.hit(tokio::time::Instant::now()) {
                    tracing::warn!(bad_lines = n, max_line_bytes = %config.max_line_bytes,
                        "Overlong serial line dropped");
                }
            }
        });
    }
}

/// Parses a whole buffer of lines like the driver does, returning the readings. For the
/// throughput benchmark and tests.
pub fn parse_buffer(config: &SerialLineConfig, data: &[u8], received_ms: i64) -> Vec<Reading> {
    let ctx = DriverContext {
        stats: std::sync::Arc::new(crate::DriverStats::new(&config.name, "serial")),
        health: std::sync::Arc::new(crate::NoHealth),
        zigbee: crate::zigbee::ZigbeeControl::default(),
    };
    let mut session = Session {
        parser: LineParser::new(config),
        framer: LineFramer::new(usize::try_from(config.max_line_bytes.bytes()).unwrap_or(4096)),
        bad_log: LogLimiter::new(LOG_EVERY),
        devices: BTreeSet::new(),
        config,
        ctx: &ctx,
    };
    let mut out = Vec::new();
    session.frames(data, received_ms, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_config::LineFormat;

    #[tokio::test]
    async fn garbage_partial_and_overlong_lines_do_not_cost_good_ones() {
        let config = SerialLineConfig {
            name: "l".into(),
            format: LineFormat::Kv,
            device_field: Some("id".into()),
            max_line_bytes: outpost_config::ByteSize(32),
            ..SerialLineConfig::default()
        };
        let data = b"id=a v=1\n\xff\xfe garbage\nid=b v=2\nid=c v=333333333333333333333333333333333333\nid=d v=4\nid=e v=";
        let readings = parse_buffer(&config, data, 7);
        let ids: Vec<_> = readings.iter().map(|r| r.device_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "d"]);
        assert_eq!(readings[0].topic, "serial/a");
        let payload: serde_json::Value =
            serde_json::from_slice(&readings[0].payload).expect("JSON");
        assert_eq!(payload, serde_json::json!({"v": 1, "time_ms": 7}));
        assert_eq!(readings[0].received_at_ms, 7);
    }

    #[tokio::test]
    async fn read_loop_ends_on_eof_and_on_shutdown() {
        use tokio::io::AsyncWriteExt;
        let config = SerialLineConfig {
            name: "l".into(),
            device_id: Some("fixed".into()),
            format: LineFormat::Kv,
            ..SerialLineConfig::default()
        };
        let ctx = DriverContext::detached("l", "serial");
        let mut session = Session {
            parser: LineParser::new(&config),
            framer: LineFramer::new(64),
            bad_log: LogLimiter::new(LOG_EVERY),
            devices: BTreeSet::new(),
            config: &config,
            ctx: &ctx,
        };
        let (sink, mut readings) = tokio::sync::mpsc::channel(8);
        let shutdown = CancellationToken::new();

        // The sensor writes a line and half of another, then the port goes away.
        let (port, mut sensor) = tokio::io::duplex(64);
        sensor.write_all(b"v=1\nv=").await.expect("write");
        drop(sensor);
        let closed = session.read(port, &sink, &shutdown).await;
        assert!(matches!(closed, Closed::Failed(ref e) if e.contains("end of file")));
        assert!(
            session.framer.reset(),
            "the partial line is pending until the reopen"
        );
        let reading = readings.recv().await.expect("one reading");
        assert_eq!(reading.device_id, "fixed");
        assert!(session.devices.contains("fixed"));

        // A port that stays silent: shutdown ends the loop.
        let (port, _sensor) = tokio::io::duplex(64);
        shutdown.cancel();
        let closed = session.read(port, &sink, &shutdown).await;
        assert!(matches!(closed, Closed::Shutdown));

        // The daemon stopped taking readings.
        drop(readings);
        let (port, mut sensor) = tokio::io::duplex(64);
        sensor.write_all(b"v=2\n").await.expect("write");
        let closed = session.read(port, &sink, &CancellationToken::new()).await;
        assert!(matches!(closed, Closed::NoSink));
        assert_eq!(ctx.stats.snapshot().frames_ok, 2);
    }
}

//! The Modbus driver (`kind = "modbus"`): polls register maps of slaves over TCP or RTU.
//!
//! * **Planning** ([`plan`]): each slave's points are grouped by (function, interval) and read in
//!   as few requests as contiguous addresses allow; each poll of a group gives one reading, a
//!   JSON object `{"<point>": value, …, "units": {…}, "time_ms": …}` ([`decode`]).
//! * **TCP**: every slave has its own connection (to `slaves[].address`, else the driver's
//!   `address`) and its own poll loop, all running concurrently inside the driver's task; a
//!   slave that stops answering costs only its own loop its timeouts, the others keep their
//!   rate. After a timeout or I/O error the connection is dropped (a late answer would be read as
//!   the next one) and reopened with capped backoff.
//! * **RTU**: the slaves share one serial line, so their polls are serialized by nature: one loop
//!   takes the group that is due first. A dead RTU slave therefore costs `timeout` on the line
//!   at each of its polls, which delays the others by that much; after a timeout the port is
//!   reopened to discard a late answer.
//! * **Failures**: timeouts, exceptions and transport errors are counted per slave
//!   ([`crate::ErrorKind`]); after `reopen.offline_after_failures` consecutive failed polls the
//!   slave's device is reported offline (once, until a poll succeeds again). The driver is
//!   reported down when all of its slaves are failing.

pub mod decode;
pub mod plan;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outpost_config::{ModbusConfig, ModbusSlaveConfig, ModbusTransport, RegisterKind};
use serde_json::{Map, Value};
use tokio::time::{Instant, timeout};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::SlaveContext;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::port::{LogLimiter, open_serial, reopen_backoff, sleep_or_stop};
use crate::{
    Driver, DriverContext, DriverError, DriverFuture, ErrorKind, JSON, Reading, ReadingSink,
    now_unix_ms,
};
use decode::{Response, decode_request};
use plan::{Group, plan};

/// Period of the rate-limited warnings per slave.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// See the module docs.
#[derive(Debug)]
pub struct ModbusDriver {
    config: ModbusConfig,
    ctx: DriverContext,
}

impl ModbusDriver {
    pub fn new(config: ModbusConfig, ctx: DriverContext) -> Self {
        Self { config, ctx }
    }
}

impl Driver for ModbusDriver {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(self: Box<Self>, sink: ReadingSink, shutdown: CancellationToken) -> DriverFuture {
        let span = tracing::info_span!("modbus", driver = %self.config.name);
        Box::pin(run(*self, sink, shutdown).instrument(span))
    }
}

async fn run(
    driver: ModbusDriver,
    sink: ReadingSink,
    shutdown: CancellationToken,
) -> Result<(), DriverError> {
    let shared = Shared {
        config: &driver.config,
        ctx: &driver.ctx,
        sink: &sink,
        shutdown: &shutdown,
        failing: AtomicUsize::new(0),
    };
    match driver.config.transport {
        ModbusTransport::Tcp => {
            let loops = (0..driver.config.slaves.len()).map(|s| shared.tcp_slave(s));
            let results = futures_util::future::join_all(loops).await;
            results.into_iter().collect()
        }
        ModbusTransport::Rtu => shared.rtu_line().await,
    }
}

/// What every poll loop of one driver shares (borrowed; all loops run in the driver's task).
struct Shared<'a> {
    config: &'a ModbusConfig,
    ctx: &'a DriverContext,
    sink: &'a ReadingSink,
    shutdown: &'a CancellationToken,
    /// Slaves currently past `offline_after_failures`.
    failing: AtomicUsize,
}

/// A poll group of one slave with its next due time.
struct Entry {
    slave: usize,
    group: Group,
    due: Instant,
}

/// Per-slave failure bookkeeping.
struct SlaveHealth {
    failures: u32,
    offline: bool,
    log: LogLimiter,
}

impl SlaveHealth {
    fn new() -> Self {
        Self {
            failures: 0,
            offline: false,
            log: LogLimiter::new(LOG_EVERY),
        }
    }
}

/// How one poll went.
enum Poll {
    Ok(Reading),
    /// The slave answered with an exception: keep the connection.
    Exception(String),
    /// Timeout or I/O error: drop the connection.
    Broken(ErrorKind, String),
}

impl Shared<'_> {
    fn entries(&self, slave: usize) -> Vec<Entry> {
        let now = Instant::now();
        plan(&self.config.slaves[slave].points)
            .into_iter()
            .map(|group| Entry {
                slave,
                group,
                due: now,
            })
            .collect()
    }

    /// The poll loop of one TCP slave, with its own connection.
    async fn tcp_slave(&self, slave: usize) -> Result<(), DriverError> {
        let cfg = &self.config.slaves[slave];
        let address = cfg
            .address
            .clone()
            .or_else(|| self.config.address.clone())
            .unwrap_or_default();
        let mut entries = self.entries(slave);
        let mut health = SlaveHealth::new();
        let mut backoff = reopen_backoff(&self.config.reopen);
        let mut link: Option<Context> = None;
        let mut connected_before = false;
        loop {
            let Some(next) = next_due(&entries) else {
                return Ok(());
            };
            if link.is_none() {
                let connected = tokio::select! {
                    connected = self.connect_tcp(&address, cfg.unit) => connected,
                    () = self.shutdown.cancelled() => return Ok(()),
                };
                match connected {
                    Ok(context) => {
                        if connected_before {
                            self.ctx.stats.reopened();
                        }
                        connected_before = true;
                        backoff.reset();
                        link = Some(context);
                    }
                    Err(e) => {
                        let error = format!("connect {address}: {e}");
                        self.failed(cfg, &mut health, ErrorKind::Transport, &error);
                        if !sleep_or_stop(backoff.failed(), self.shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            if !self.wait_until(entries[next].due).await {
                return Ok(());
            }
            let Some(context) = link.as_mut() else {
                continue;
            };
            let Some(outcome) = self.poll_or_stop(context, cfg, &entries[next].group).await else {
                return Ok(());
            };
            match outcome {
                Poll::Ok(reading) => {
                    self.succeeded(cfg, &mut health);
                    if self.sink.send(reading).await.is_err() {
                        return Err(DriverError::SinkClosed);
                    }
                }
                Poll::Exception(error) => {
                    self.failed(cfg, &mut health, ErrorKind::Exception, &error);
                }
                Poll::Broken(kind, error) => {
                    self.failed(cfg, &mut health, kind, &error);
                    link = None;
                }
            }
            reschedule(&mut entries[next]);
        }
    }

    /// The single poll loop of an RTU line shared by every slave.
    async fn rtu_line(&self) -> Result<(), DriverError> {
        let Some(port_config) = &self.config.serial else {
            return Err(DriverError::Fatal {
                driver: self.config.name.clone(),
                message: "transport = \"rtu\" needs [drivers.serial]".into(),
            });
        };
        let mut entries: Vec<Entry> = (0..self.config.slaves.len())
            .flat_map(|s| self.entries(s))
            .collect();
        let mut health: Vec<SlaveHealth> = self
            .config
            .slaves
            .iter()
            .map(|_| SlaveHealth::new())
            .collect();
        let mut backoff = reopen_backoff(&self.config.reopen);
        let mut open_log = LogLimiter::new(LOG_EVERY);
        let mut link: Option<Context> = None;
        let mut opened_before = false;
        let mut port_failed = false;
        loop {
            let Some(next) = next_due(&entries) else {
                return Ok(());
            };
            if link.is_none() {
                match open_serial(port_config) {
                    Ok(port) => {
                        if port_failed {
                            self.ctx.stats.reopened();
                            tracing::info!("Modbus RTU port reopened");
                        } else if !opened_before {
                            tracing::info!(path = %port_config.path.display(), "Modbus RTU port opened");
                        }
                        opened_before = true;
                        port_failed = false;
                        backoff.reset();
                        link = Some(tokio_modbus::client::rtu::attach(port));
                    }
                    Err(e) => {
                        port_failed = true;
                        let error = e.to_string();
                        if let Some(n) = open_log.hit(Instant::now()) {
                            tracing::warn!(error = %error, attempts = n, "Cannot open Modbus RTU port; retrying");
                        }
                        for (s, h) in health.iter_mut().enumerate() {
                            self.failed(&self.config.slaves[s], h, ErrorKind::Transport, &error);
                        }
                        if !sleep_or_stop(backoff.failed(), self.shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            if !self.wait_until(entries[next].due).await {
                return Ok(());
            }
            let Some(context) = link.as_mut() else {
                continue;
            };
            let slave = entries[next].slave;
            let cfg = &self.config.slaves[slave];
            context.set_slave(tokio_modbus::Slave(cfg.unit));
            let Some(outcome) = self.poll_or_stop(context, cfg, &entries[next].group).await else {
                return Ok(());
            };
            match outcome {
                Poll::Ok(reading) => {
                    self.succeeded(cfg, &mut health[slave]);
                    if self.sink.send(reading).await.is_err() {
                        return Err(DriverError::SinkClosed);
                    }
                }
                Poll::Exception(error) => {
                    self.failed(cfg, &mut health[slave], ErrorKind::Exception, &error);
                }
                Poll::Broken(kind, error) => {
                    self.failed(cfg, &mut health[slave], kind, &error);
                    // Reopen to discard a late answer; an I/O error means the port itself
                    // failed and is reopened with backoff.
                    link = None;
                    if kind == ErrorKind::Transport {
                        port_failed = true;
                        if !sleep_or_stop(backoff.failed(), self.shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
            reschedule(&mut entries[next]);
        }
    }

    async fn connect_tcp(&self, address: &str, unit: u8) -> std::io::Result<Context> {
        let attempt = async {
            let mut last = None;
            for addr in tokio::net::lookup_host(address).await? {
                match tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(unit))
                    .await
                {
                    Ok(context) => return Ok(context),
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
        };
        match timeout(self.config.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out",
            )),
        }
    }

    /// Sleeps until `due` unless shutdown; false on shutdown.
    async fn wait_until(&self, due: Instant) -> bool {
        tokio::select! {
            () = tokio::time::sleep_until(due) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// [`Self::poll`], or `None` once shutdown fires (a poll may wait up to `timeout` per
    /// request, which can exceed the shutdown grace).
    async fn poll_or_stop(
        &self,
        context: &mut Context,
        slave: &ModbusSlaveConfig,
        group: &Group,
    ) -> Option<Poll> {
        tokio::select! {
            outcome = self.poll(context, slave, group) => Some(outcome),
            () = self.shutdown.cancelled() => None,
        }
    }

    /// Reads every request of `group` from the slave and decodes one reading.
    async fn poll(&self, context: &mut Context, slave: &ModbusSlaveConfig, group: &Group) -> Poll {
        let received_at_ms = now_unix_ms();
        let (mut fields, mut units) = (Map::new(), Map::new());
        for request in &group.requests {
            let (start, count) = (request.start, request.count);
            let answer = match group.function {
                RegisterKind::Coil => {
                    timeout(self.config.timeout, context.read_coils(start, count))
                        .await
                        .map(|r| r.map(|r| r.map(Answer::Bits)))
                }
                RegisterKind::DiscreteInput => timeout(
                    self.config.timeout,
                    context.read_discrete_inputs(start, count),
                )
                .await
                .map(|r| r.map(|r| r.map(Answer::Bits))),
                RegisterKind::Holding => timeout(
                    self.config.timeout,
                    context.read_holding_registers(start, count),
                )
                .await
                .map(|r| r.map(|r| r.map(Answer::Words))),
                RegisterKind::Input => timeout(
                    self.config.timeout,
                    context.read_input_registers(start, count),
                )
                .await
                .map(|r| r.map(|r| r.map(Answer::Words))),
            };
            let answer = match answer {
                Err(_) => {
                    return Poll::Broken(
                        ErrorKind::Timeout,
                        format!("no answer within {:?}", self.config.timeout),
                    );
                }
                Ok(Err(e)) => return Poll::Broken(ErrorKind::Transport, e.to_string()),
                Ok(Ok(Err(code))) => {
                    return Poll::Exception(format!(
                        "exception {code} reading {count} from {start}"
                    ));
                }
                Ok(Ok(Ok(answer))) => answer,
            };
            let response = match &answer {
                Answer::Bits(bits) => Response::Bits(bits),
                Answer::Words(words) => Response::Registers(words),
            };
            if let Err(e) =
                decode_request(request, response, &slave.points, &mut fields, &mut units)
            {
                self.ctx.stats.frame_bad();
                return Poll::Exception(e.to_string());
            }
        }
        self.ctx.stats.frame_ok();
        fields.insert("time_ms".to_owned(), Value::from(received_at_ms));
        if !units.is_empty() {
            fields.insert("units".to_owned(), Value::Object(units));
        }
        let payload = serde_json::to_vec(&Value::Object(fields)).unwrap_or_default();
        Poll::Ok(Reading {
            driver: self.config.name.clone(),
            device_id: slave.device_id.clone(),
            topic: self.config.topic_for(&slave.device_id),
            route: self.config.route.clone(),
            content_type: Some(JSON.to_owned()),
            payload,
            received_at_ms,
        })
    }

    fn succeeded(&self, slave: &ModbusSlaveConfig, health: &mut SlaveHealth) {
        if health.offline {
            tracing::info!(device = %slave.device_id, "Modbus slave answers again");
            self.failing.fetch_sub(1, Ordering::Relaxed);
        }
        health.failures = 0;
        health.offline = false;
        self.ctx.stats.set_up();
    }

    fn failed(
        &self,
        slave: &ModbusSlaveConfig,
        health: &mut SlaveHealth,
        kind: ErrorKind,
        error: &str,
    ) {
        self.ctx.stats.device_error(&slave.device_id, kind);
        let message = format!("slave {} ({}): {error}", slave.unit, slave.device_id);
        self.ctx.stats.error(message.clone());
        health.failures = health.failures.saturating_add(1);
        if let Some(n) = health.log.hit(Instant::now()) {
            tracing::warn!(device = %slave.device_id, unit = slave.unit, kind = kind.as_str(),
                error = %error, failures = n, "Modbus poll failed");
        }
        if !health.offline && health.failures >= self.config.reopen.offline_after_failures {
            health.offline = true;
            tracing::warn!(device = %slave.device_id, failures = health.failures,
                "Modbus slave not answering; device reported offline");
            self.ctx
                .health
                .offline(&self.config.name, &slave.device_id, &message);
            let failing = self.failing.fetch_add(1, Ordering::Relaxed) + 1;
            if failing >= self.config.slaves.len() {
                self.ctx.stats.set_down(message);
            }
        }
    }
}

enum Answer {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// The entry due first.
fn next_due(entries: &[Entry]) -> Option<usize> {
    entries
        .iter()
        .enumerate()
        .min_by_key(|(_, e)| e.due)
        .map(|(i, _)| i)
}

/// Next due time: one interval later; polls missed while the slave was slow are skipped, not
/// made up in a burst.
fn reschedule(entry: &mut Entry) {
    let now = Instant::now();
    entry.due += entry.group.interval;
    if entry.due < now {
        entry.due = now + entry.group.interval;
    }
}

//! Zigbee coordinator driver for TI Z-Stack 3.x sticks (CC2652/CC1352) over MT/UNPI frames.
//!
//! The driver is a state machine: `Connecting` (open the port, capped exponential backoff) →
//! `Starting` (the start-up sequence below) → `Running` (indications become readings, control
//! requests are served) → back to `Connecting` on any port error, EOF or SREQ timeout. An
//! unplugged stick therefore costs a reopen and a new start-up, never the daemon.
//!
//! Start-up (every SREQ expects its SRSP within [`SREQ_TIMEOUT`]):
//! 1. `SYS_RESET_REQ` (soft) → wait for `SYS_RESET_IND`;
//! 2. `SYS_PING`, `SYS_VERSION` (logged);
//! 3. `UTIL_GET_DEVICE_INFO`: when the device state is already `DEV_ZB_COORD` (9), skip to 5;
//! 4. `SYS_OSAL_NV_READ` `ZCD_NV_BDBNODEISONANETWORK`: when 1, resume the stored network with
//!    `ZDO_STARTUP_FROM_APP` → wait for `ZDO_STATE_CHANGE_IND` 9; otherwise (fresh stick, the
//!    item is 0 or missing) form a network: `SYS_OSAL_NV_WRITE`
//!    `ZCD_NV_LOGICAL_TYPE` = coordinator and `ZCD_NV_PANID`, `APP_CNF_BDB_SET_CHANNEL` (primary
//!    = the configured channel, secondary = none), `APP_CNF_BDB_START_COMMISSIONING` (formation)
//!    → wait for `ZDO_STATE_CHANGE_IND` 9;
//! 5. `AF_REGISTER` endpoint 1, profile 0x0104 (Home Automation); "already registered" is fine;
//! 6. `ZDO_EXT_NWK_INFO`: the channel, PAN id and extended PAN id the stick is really on, logged
//!    and shown in the status (a resumed network keeps its own, whatever the config says).
//!
//! Running: `ZDO_END_DEVICE_ANNCE_IND` teaches the nwk → IEEE table (bounded, [`MAX_DEVICES`])
//! and emits a `"joined"` reading, which registers the device (id [`mt::device_id`],
//! `zigbee-<16 hex digits of the IEEE address>`). `AF_INCOMING_MSG` carrying ZCL Report
//! Attributes or Read Attributes Response become one reading per message ([`zcl`]); a source
//! not in the table is looked up with `UTIL_ADDRMGR_NWK_ADDR_LOOKUP` (the stick's address
//! manager survives our restarts). Bad frames and malformed ZCL payloads are counted and
//! logged, never fatal. Permit-join requests arrive through [`ZigbeeControl`].
//!
//! Left out of Zigbee 3.0: install codes, touchlink, OTA upgrades, binding and reporting
//! configuration (devices report with their defaults or as configured elsewhere), groups and
//! scenes, cluster commands to devices (on/off control), router neighbour/routing tables,
//! network key rotation, channel change, and end devices' leave handling. The
//! CC2652 bootloader-skip byte is not sent (sticks with the standard firmware don't need it).

pub mod frame;
pub mod mt;
pub mod zcl;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_config::ZigbeeConfig;
use serde_json::{Map, Value as Json, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::frame::{CmdType, Decoder, Frame, FrameError, subsystem};
use crate::port::{Backoff, open_serial, reopen_backoff, sleep_or_stop};
use crate::{
    Driver, DriverContext, DriverError, DriverFuture, JSON, Reading, ReadingSink, now_unix_ms,
};

/// How long an SREQ waits for its SRSP.
pub const SREQ_TIMEOUT: Duration = Duration::from_secs(6);
/// How long the stick may take to reset.
const RESET_TIMEOUT: Duration = Duration::from_secs(6);
/// How long network resume or formation may take.
const FORMATION_TIMEOUT: Duration = Duration::from_secs(60);
/// An incomplete frame older than this is given up (UART inter-frame gap).
const STALE_FRAME: Duration = Duration::from_millis(200);
/// Bound of the nwk → IEEE table; the oldest entry is evicted beyond it.
pub const MAX_DEVICES: usize = 1024;
/// Frames read while waiting for an SRSP, processed afterwards. Beyond it the oldest is
/// dropped (counted): the stick only floods us this much if something is badly wrong.
const BACKLOG: usize = 256;
/// Requests queued for the driver; a full queue answers "busy" (503) at once.
pub const CONTROL_QUEUE: usize = 4;

/// A `SYS_PING` this often while running detects a stick that hangs without closing the port.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Clusters named in AF_REGISTER (as client clusters, so that devices may bind to them).
const CLUSTERS: &[u16] = &[
    zcl::cluster::POWER_CONFIGURATION,
    zcl::cluster::ON_OFF,
    zcl::cluster::ILLUMINANCE,
    zcl::cluster::TEMPERATURE,
    zcl::cluster::PRESSURE,
    zcl::cluster::HUMIDITY,
    zcl::cluster::OCCUPANCY,
];

/// A request to the running driver.
#[derive(Debug)]
pub enum ControlRequest {
    /// Open the network for joining for this many seconds (capped by `permit_join_max`).
    PermitJoin {
        duration: Duration,
        reply: oneshot::Sender<Result<Duration, ControlError>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No Zigbee driver is configured: the request cannot be served (409).
    #[error("no zigbee driver is configured")]
    NoDriver,
    /// The driver exists but its stick is not ready (unplugged, starting): retry later (503).
    #[error("zigbee coordinator is not ready: {0}")]
    Unavailable(String),
    /// The stick refused the request: report it (502).
    #[error("zigbee coordinator answered status {0:#04x}")]
    Refused(u8),
}

/// The daemon's handle to the Zigbee driver. Cheap to clone.
///
/// The first configured Zigbee driver attaches to it ([`ZigbeeControl::driver`]); requests go
/// through a bounded queue of [`CONTROL_QUEUE`].
#[derive(Debug, Clone, Default)]
pub struct ZigbeeControl {
    tx: Arc<Mutex<Option<mpsc::Sender<ControlRequest>>>>,
}

impl ZigbeeControl {
    /// Builds the driver for `config` and, if no driver is attached yet, attaches it.
    pub fn driver(&self, config: ZigbeeConfig, ctx: DriverContext) -> ZigbeeDriver {
        ZigbeeDriver::new(config, ctx, self.attach())
    }

    /// The receiving end of a new request queue, attached unless another one already is
    /// (then the returned queue never receives). The driver uses it; tests answer on it.
    pub fn attach(&self) -> mpsc::Receiver<ControlRequest> {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let mut slot = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(tx);
        }
        rx
    }

    /// Asks the driver to permit joining for `duration`; returns the duration granted.
    pub async fn permit_join(&self, duration: Duration) -> Result<Duration, ControlError> {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ControlError::NoDriver)?;
        let (reply, rx) = oneshot::channel();
        tx.try_send(ControlRequest::PermitJoin { duration, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    ControlError::Unavailable("busy with other requests".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    ControlError::Unavailable("driver stopped".into())
                }
            })?;
        match tokio::time::timeout(SREQ_TIMEOUT * 2, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ControlError::Unavailable("driver stopped".into())),
            Err(_) => Err(ControlError::Unavailable("no answer in time".into())),
        }
    }
}

/// Why a session with the stick ended; the driver reconnects after any of them.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("serial port {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("serial port {0} closed (stick unplugged?)")]
    Eof(String),
    #[error("no {what} from the stick within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("stick answered {what} with status {status:#04x}")]
    Status { what: &'static str, status: u8 },
    #[error("stick sent a malformed {0}")]
    Malformed(&'static str),
    /// `SYS_RESET_IND` while running (watchdog, power glitch): run the start-up again.
    #[error("stick reset unexpectedly")]
    UnexpectedReset,
    /// Shutdown or the sink closed: stop the driver.
    #[error("stopping")]
    Stop(DriverError),
}

/// Counters beyond the shared [`crate::DriverStats`], logged with the events that change them.
#[derive(Debug, Default, Clone)]
struct Stats {
    frames_bad: u64,
    zcl_malformed: u64,
    unknown_source: u64,
    backlog_dropped: u64,
    sessions: u64,
}

#[derive(Debug)]
pub struct ZigbeeDriver {
    config: ZigbeeConfig,
    ctx: DriverContext,
    control: mpsc::Receiver<ControlRequest>,
    /// nwk address → IEEE address, insertion order kept for eviction.
    table: HashMap<u16, u64>,
    order: VecDeque<u16>,
    stats: Stats,
}

impl ZigbeeDriver {
    /// A driver whose control requests come from `control` (see [`ZigbeeControl`]).
    pub fn new(
        config: ZigbeeConfig,
        ctx: DriverContext,
        control: mpsc::Receiver<ControlRequest>,
    ) -> Self {
        Self {
            config,
            ctx,
            control,
            table: HashMap::new(),
            order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    async fn run_loop(
        mut self: Box<Self>,
        sink: ReadingSink,
        shutdown: CancellationToken,
    ) -> Result<(), DriverError> {
        let mut backoff = reopen_backoff(&self.config.reopen);
        loop {
            // Connecting
            let port = match open_serial(&self.config.serial) {
                Ok(port) => port,
                Err(e) => {
                    let why = e.to_string();
                    if !self.failed(&mut backoff, &why, &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            if self.stats.sessions > 0 {
                self.ctx.stats.reopened();
                info!(path = %self.config.serial.path.display(), "Zigbee stick reopened");
            }
            self.stats.sessions += 1;
            let mut session = Session::new(&mut self, port, &sink, &shutdown);
            // Starting → Running
            let result = match session.start().await {
                Ok(()) => {
                    backoff.reset();
                    session.driver.ctx.stats.set_up();
                    session.serve().await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) | Err(SessionError::Stop(DriverError::SinkClosed)) => return Ok(()),
                Err(SessionError::Stop(e)) => return Err(e),
                Err(e) => {
                    if !self.failed(&mut backoff, &e.to_string(), &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Records a failed open or a lost session, reports the devices offline after
    /// `offline_after_failures` in a row, and waits the backoff. False on shutdown.
    async fn failed(
        &mut self,
        backoff: &mut Backoff,
        why: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let wait = backoff.failed();
        self.ctx.stats.set_down(why);
        warn!(error = why, failures = backoff.failures(), retry_in = ?wait, "Zigbee stick unavailable");
        if backoff.failures() == self.config.reopen.offline_after_failures {
            for ieee in self.table.values() {
                self.ctx
                    .health
                    .offline(&self.config.name, &mt::device_id(*ieee), why);
            }
        }
        self.idle(wait, shutdown, why).await
    }

    /// Waits `delay` while answering control requests with "unavailable". False on shutdown.
    async fn idle(&mut self, delay: Duration, shutdown: &CancellationToken, why: &str) -> bool {
        let until = sleep_or_stop(delay, shutdown);
        tokio::pin!(until);
        loop {
            tokio::select! {
                go_on = &mut until => return go_on,
                Some(req) = self.control.recv() => match req {
                    ControlRequest::PermitJoin { reply, .. } => {
                        let _ = reply.send(Err(ControlError::Unavailable(why.to_owned())));
                    }
                },
            }
        }
    }

    fn learn(&mut self, nwk: u16, ieee: u64) {
        if self.table.insert(nwk, ieee).is_none() {
            self.order.push_back(nwk);
            if self.order.len() > MAX_DEVICES
                && let Some(old) = self.order.pop_front()
            {
                self.table.remove(&old);
            }
        }
    }
}

impl Driver for ZigbeeDriver {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn run(self: Box<Self>, sink: ReadingSink, shutdown: CancellationToken) -> DriverFuture {
        Box::pin(self.run_loop(sink, shutdown))
    }
}

/// One connection to the stick, from open to error. `L` is the serial port (a duplex pipe in
/// unit tests).
struct Session<'a, L> {
    driver: &'a mut ZigbeeDriver,
    port: L,
    decoder: Decoder,
    /// Frames that arrived while waiting for an SRSP or an indication.
    backlog: VecDeque<Frame>,
    sink: &'a ReadingSink,
    shutdown: &'a CancellationToken,
    coordinator_state: u8,
}

impl<'a, L: AsyncRead + AsyncWrite + Unpin> Session<'a, L> {
    fn new(
        driver: &'a mut ZigbeeDriver,
        port: L,
        sink: &'a ReadingSink,
        shutdown: &'a CancellationToken,
    ) -> Self {
        Self {
            driver,
            port,
            decoder: Decoder::new(),
            backlog: VecDeque::new(),
            sink,
            shutdown,
            coordinator_state: 0,
        }
    }

    fn path(&self) -> String {
        self.driver.config.serial.path.display().to_string()
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let bytes = frame
            .encode()
            .map_err(|_| SessionError::Malformed("request (too long)"))?;
        let written = match self.port.write_all(&bytes).await {
            Ok(()) => self.port.flush().await,
            Err(e) => Err(e),
        };
        written.map_err(|source| SessionError::Io {
            path: self.path(),
            source,
        })
    }

    /// The next good frame from the port. Cancel-safe: bytes read are in the decoder.
    async fn read_frame(&mut self) -> Result<Frame, SessionError> {
        let mut buf = [0u8; 512];
        loop {
            while let Some(result) = self.decoder.next_frame() {
                match result {
                    Ok(frame) => {
                        self.driver.ctx.stats.frame_ok();
                        return Ok(frame);
                    }
                    Err(e) => self.bad_frame(&e),
                }
            }
            let read = if self.decoder.pending() > 0 {
                match tokio::time::timeout(STALE_FRAME, self.port.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        if let Some(e) = self.decoder.discard_stale() {
                            self.bad_frame(&e);
                        }
                        continue;
                    }
                }
            } else {
                self.port.read(&mut buf).await
            };
            match read {
                Ok(0) => return Err(SessionError::Eof(self.path())),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(source) => {
                    return Err(SessionError::Io {
                        path: self.path(),
                        source,
                    });
                }
            }
        }
    }

    fn bad_frame(&mut self, e: &FrameError) {
        self.driver.stats.frames_bad += 1;
        self.driver.ctx.stats.frame_bad();
        warn!(error = %e, frames_bad = self.driver.stats.frames_bad, "Skipped a bad Z-Stack frame");
    }

    fn defer(&mut self, frame: Frame) {
        if self.backlog.len() >= BACKLOG {
            self.backlog.pop_front();
            self.driver.stats.backlog_dropped += 1;
            self.driver.ctx.stats.frame_dropped();
            warn!(
                dropped = self.driver.stats.backlog_dropped,
                "Z-Stack frame backlog full; dropped the oldest"
            );
        }
        self.backlog.push_back(frame);
    }

    /// Sends an SREQ and returns its SRSP's data. Other frames meanwhile go to the backlog.
    async fn request(&mut self, frame: Frame, what: &'static str) -> Result<Vec<u8>, SessionError> {
        self.send(&frame).await?;
        let sub = frame.subsystem();
        let id = frame.cmd1;
        let deadline = Instant::now() + SREQ_TIMEOUT;
        loop {
            let f = self.read_until(deadline, what, SREQ_TIMEOUT).await?;
            if f.is(CmdType::Srsp, sub, id) {
                return Ok(f.data);
            }
            if f.kind() == Some(CmdType::Srsp) {
                debug!(cmd0 = f.cmd0, cmd1 = f.cmd1, "Ignored a stray SRSP");
            } else {
                self.defer(f);
            }
        }
    }

    /// Like [`Self::request`] for SRSPs whose first byte is a status that must be 0 (or one
    /// of `also_ok`).
    async fn request_ok(
        &mut self,
        frame: Frame,
        what: &'static str,
        also_ok: &[u8],
    ) -> Result<(), SessionError> {
        let data = self.request(frame, what).await?;
        let status = *data.first().ok_or(SessionError::Malformed(what))?;
        if status == 0 || also_ok.contains(&status) {
            Ok(())
        } else {
            Err(SessionError::Status { what, status })
        }
    }

    async fn read_until(
        &mut self,
        deadline: Instant,
        what: &str,
        timeout: Duration,
    ) -> Result<Frame, SessionError> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(SessionError::Stop(DriverError::SinkClosed)),
            r = tokio::time::timeout_at(deadline, self.read_frame()) => r.unwrap_or_else(|_| {
                Err(SessionError::Timeout { what: what.to_owned(), timeout })
            }),
        }
    }

    /// Waits for an AREQ `subsystem`/`id` whose data satisfies `accept`.
    async fn wait_for(
        &mut self,
        sub: u8,
        id: u8,
        what: &'static str,
        timeout: Duration,
        accept: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, SessionError> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.read_until(deadline, what, timeout).await?;
            if f.is(CmdType::Areq, sub, id) && accept(&f.data) {
                return Ok(f.data);
            }
            if f.is(CmdType::Areq, subsystem::ZDO, mt::ZDO_STATE_CHANGE_IND) {
                self.coordinator_state = f.data.first().copied().unwrap_or(0);
            }
            if f.kind() != Some(CmdType::Srsp) {
                self.defer(f);
            }
        }
    }

    async fn start(&mut self) -> Result<(), SessionError> {
        use self::mt::*;
        let s = subsystem::SYS;
        self.send(&sys_reset_soft()).await?;
        let ind = self
            .wait_for(s, SYS_RESET_IND, "SYS_RESET_IND", RESET_TIMEOUT, |_| true)
            .await?;
        // Frames from before the reset are meaningless now.
        self.backlog.clear();
        self.request(sreq(s, SYS_PING, vec![]), "SYS_PING").await?;
        let v = self
            .request(sreq(s, SYS_VERSION, vec![]), "SYS_VERSION")
            .await?;
        let version = |i: usize| v.get(i).copied().unwrap_or(0);
        info!(
            reset_reason = ind.first().copied().unwrap_or(0),
            product = version(1),
            version = %format!("{}.{}.{}", version(2), version(3), version(4)),
            "Z-Stack coordinator reset"
        );
        let info = self
            .request(
                sreq(subsystem::UTIL, UTIL_GET_DEVICE_INFO, vec![]),
                "UTIL_GET_DEVICE_INFO",
            )
            .await?;
        let (ieee, state) =
            parse_device_info(&info).ok_or(SessionError::Malformed("UTIL_GET_DEVICE_INFO"))?;
        if state != DEV_ZB_COORD {
            self.resume_or_form().await?;
        }
        self.request_ok(
            af_register(&[0x0000], CLUSTERS),
            "AF_REGISTER",
            &[STATUS_DUPLICATE],
        )
        .await?;
        let nwk = self
            .request(
                sreq(subsystem::ZDO, ZDO_EXT_NWK_INFO, vec![]),
                "ZDO_EXT_NWK_INFO",
            )
            .await?;
        self.network_up(ieee, parse_network_info(&nwk));
        Ok(())
    }

    /// Logs and reports the network the stick is on. That is the stick's own: a stick that
    /// already has a network keeps it, and the configured channel and PAN id only apply when
    /// forming a new one — so a difference is worth a warning, never a silent log of the
    /// config's values.
    fn network_up(&self, ieee: u64, network: Option<mt::NetworkInfo>) {
        let c = &self.driver.config;
        let coordinator = format!("{ieee:016x}");
        let mut details = std::collections::BTreeMap::from([("coordinator", coordinator.clone())]);
        let Some(n) = network else {
            warn!(coordinator = %coordinator, "Zigbee network up; the stick did not report its channel and PAN id (ZDO_EXT_NWK_INFO)");
            self.driver.ctx.stats.set_details(details);
            return;
        };
        let pan_id = format!("{:#06x}", n.pan_id);
        let extended_pan_id = format!("{:016x}", n.extended_pan_id);
        info!(
            coordinator = %coordinator,
            channel = n.channel,
            pan_id = %pan_id,
            extended_pan_id = %extended_pan_id,
            "Zigbee network up"
        );
        if n.channel != c.channel || n.pan_id != c.pan_id {
            warn!(
                channel = n.channel,
                pan_id = %pan_id,
                config_channel = c.channel,
                config_pan_id = %format!("{:#06x}", c.pan_id),
                "The Zigbee stick keeps the network it has; the configured channel and PAN id apply only when a new network is formed"
            );
        }
        details.insert("channel", n.channel.to_string());
        details.insert("pan_id", pan_id);
        details.insert("extended_pan_id", extended_pan_id);
        self.driver.ctx.stats.set_details(details);
    }

    async fn resume_or_form(&mut self) -> Result<(), SessionError> {
        use self::mt::*;
        let coordinator = |d: &[u8]| d.first() == Some(&DEV_ZB_COORD);
        self.coordinator_state = 0;
        // SRSP: Status Len Value[Len]; an item that does not exist (fresh stick) is "no".
        let on_network = self
            .request(nv_read(ZCD_NV_BDBNODEISONANETWORK), "SYS_OSAL_NV_READ")
            .await?;
        if on_network.first() == Some(&0) && on_network.get(2) == Some(&1) {
            info!("Resuming the Zigbee network stored in the stick");
            self.request(
                sreq(
                    subsystem::ZDO,
                    ZDO_STARTUP_FROM_APP,
                    100u16.to_le_bytes().to_vec(),
                ),
                "ZDO_STARTUP_FROM_APP",
            )
            .await?;
        } else {
            let c = &self.driver.config;
            let (pan, mask) = (c.pan_id.to_le_bytes(), 1u32 << c.channel);
            info!(channel = c.channel, pan_id = %format!("{:#06x}", c.pan_id), "Forming a Zigbee network");
            self.request_ok(
                nv_write(ZCD_NV_LOGICAL_TYPE, &[0x00]),
                "SYS_OSAL_NV_WRITE",
                &[],
            )
            .await?;
            self.request_ok(nv_write(ZCD_NV_PANID, &pan), "SYS_OSAL_NV_WRITE", &[])
                .await?;
            self.request_ok(bdb_set_channel(true, mask), "APP_CNF_BDB_SET_CHANNEL", &[])
                .await?;
            self.request_ok(bdb_set_channel(false, 0), "APP_CNF_BDB_SET_CHANNEL", &[])
                .await?;
            self.request_ok(
                sreq(
                    subsystem::APP_CNF,
                    APP_CNF_BDB_START_COMMISSIONING,
                    vec![BDB_NETWORK_FORMATION],
                ),
                "APP_CNF_BDB_START_COMMISSIONING",
                &[],
            )
            .await?;
        }
        if self.coordinator_state == DEV_ZB_COORD
            || self.backlog.iter().any(|f| {
                f.is(CmdType::Areq, subsystem::ZDO, ZDO_STATE_CHANGE_IND) && coordinator(&f.data)
            })
        {
            return Ok(());
        }
        self.wait_for(
            subsystem::ZDO,
            ZDO_STATE_CHANGE_IND,
            "ZDO_STATE_CHANGE_IND (coordinator)",
            FORMATION_TIMEOUT,
            coordinator,
        )
        .await
        .map(drop)
    }

    /// Running: indications, control requests, until an error or shutdown.
    async fn serve(&mut self) -> Result<(), SessionError> {
        // The receiver outlives sessions; borrow it out of the driver while serving.
        let (_, placeholder) = mpsc::channel(1);
        let mut control = std::mem::replace(&mut self.driver.control, placeholder);
        let result = self.serve_with(&mut control).await;
        self.driver.control = control;
        result
    }

    async fn serve_with(
        &mut self,
        control: &mut mpsc::Receiver<ControlRequest>,
    ) -> Result<(), SessionError> {
        let mut keepalive = tokio::time::interval_at(Instant::now() + KEEPALIVE, KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(frame) = self.backlog.pop_front() {
                self.handle(frame).await?;
                continue;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                Some(req) = control.recv() => self.control(req).await?,
                _ = keepalive.tick() => {
                    let ping = mt::sreq(subsystem::SYS, mt::SYS_PING, vec![]);
                    self.request(ping, "SYS_PING (keepalive)").await.map(drop)?;
                }
                f = self.read_frame() => self.handle(f?).await?,
            }
        }
    }

    async fn control(&mut self, req: ControlRequest) -> Result<(), SessionError> {
        match req {
            ControlRequest::PermitJoin { duration, reply } => {
                let max = self
                    .driver
                    .config
                    .permit_join_max
                    .min(Duration::from_secs(254));
                let granted = duration.min(max);
                let secs = granted.as_secs() as u8;
                let data = self
                    .request(mt::permit_join(secs), "ZDO_MGMT_PERMIT_JOIN_REQ")
                    .await;
                let result = match &data {
                    Ok(d) if d.first() == Some(&0) => Ok(Duration::from_secs(secs.into())),
                    Ok(d) => Err(ControlError::Refused(d.first().copied().unwrap_or(0xff))),
                    Err(e) => Err(ControlError::Unavailable(e.to_string())),
                };
                info!(seconds = secs, ok = result.is_ok(), "Zigbee permit join");
                let _ = reply.send(result);
                data.map(drop)
            }
        }
    }

    async fn handle(&mut self, f: Frame) -> Result<(), SessionError> {
        use self::mt::*;
        if f.is(CmdType::Areq, subsystem::ZDO, ZDO_END_DEVICE_ANNCE_IND) {
            let Some(a) = parse_announce(&f.data) else {
                self.malformed("ZDO_END_DEVICE_ANNCE_IND too short", None);
                return Ok(());
            };
            self.driver.learn(a.nwk, a.ieee);
            let id = device_id(a.ieee);
            info!(device = %id, nwk = %format!("{:#06x}", a.nwk), "Zigbee device announced");
            let payload = json!({
                "event": "joined",
                "ieee": format!("{:016x}", a.ieee),
                "nwk": format!("{:#06x}", a.nwk),
                "capabilities": a.capabilities,
            });
            self.emit(&id, payload).await
        } else if f.is(CmdType::Areq, subsystem::AF, AF_INCOMING_MSG) {
            self.incoming(&f.data).await
        } else if f.is(CmdType::Areq, subsystem::SYS, SYS_RESET_IND) {
            // The stick reset by itself (watchdog, power glitch): start over.
            Err(SessionError::UnexpectedReset)
        } else {
            debug!(
                cmd0 = f.cmd0,
                cmd1 = f.cmd1,
                len = f.data.len(),
                "Ignored Z-Stack frame"
            );
            Ok(())
        }
    }

    async fn incoming(&mut self, data: &[u8]) -> Result<(), SessionError> {
        let Some(msg) = mt::parse_incoming(data) else {
            self.malformed("AF_INCOMING_MSG too short", None);
            return Ok(());
        };
        let decoded = match zcl::decode(msg.cluster, msg.payload) {
            Ok(d) => d,
            Err(zcl::ZclError::NotAttributes {
                frame_control,
                command,
            }) => {
                // Other ZCL commands (cluster-specific ones, e.g. IAS zone notifications) are
                // kept raw rather than dropped.
                let Some(ieee) = self.ieee_of(msg.src).await? else {
                    return self.unknown_source(msg.src);
                };
                let payload = json!({
                    "cluster": format!("{:#06x}", msg.cluster),
                    "endpoint": msg.src_endpoint,
                    "linkquality": msg.link_quality,
                    "zcl": {
                        "cluster_specific": frame_control & 0x03 == 1,
                        "command": format!("{command:#04x}"),
                        "frame": zcl::hex(msg.payload),
                    },
                });
                return self.emit(&mt::device_id(ieee), payload).await;
            }
            Err(e) => {
                self.malformed(&e.to_string(), None);
                return Ok(());
            }
        };
        let (cluster, src, ep, lqi) = (msg.cluster, msg.src, msg.src_endpoint, msg.link_quality);
        if let Some(e) = &decoded.error {
            self.malformed(&e.to_string(), Some(src));
        }
        let Some(ieee) = self.ieee_of(src).await? else {
            return self.unknown_source(src);
        };
        if decoded.attributes.is_empty() {
            return Ok(());
        }
        let mut payload = Map::new();
        payload.insert("cluster".into(), format!("{cluster:#06x}").into());
        payload.insert("endpoint".into(), ep.into());
        payload.insert("linkquality".into(), lqi.into());
        let mut units = Map::new();
        let mut raw = Vec::new();
        for a in &decoded.attributes {
            match zcl::interpret(a) {
                Some(v) => {
                    let value = match v.value {
                        zcl::ValueKind::Number(n) => json!(n),
                        zcl::ValueKind::Bool(b) => json!(b),
                    };
                    payload.insert(v.name.into(), value);
                    if let Some(unit) = v.unit {
                        units.insert(v.name.into(), unit.into());
                    }
                }
                None => {
                    let mut entry = json!({
                        "cluster": format!("{:#06x}", a.cluster),
                        "attribute": format!("{:#06x}", a.id),
                        "type": format!("{:#04x}", a.data_type),
                        "data": zcl::hex(&a.raw),
                    });
                    if let Some(code) = a.manufacturer {
                        entry["manufacturer"] = format!("{code:#06x}").into();
                    }
                    raw.push(entry);
                }
            }
        }
        if !units.is_empty() {
            payload.insert("units".into(), units.into());
        }
        if !raw.is_empty() {
            payload.insert("raw".into(), raw.into());
        }
        self.emit(&mt::device_id(ieee), Json::Object(payload)).await
    }

    fn unknown_source(&mut self, src: u16) -> Result<(), SessionError> {
        self.driver.stats.unknown_source += 1;
        self.driver.ctx.stats.frame_dropped();
        warn!(
            nwk = %format!("{src:#06x}"),
            unknown = self.driver.stats.unknown_source,
            "Zigbee message from a device neither announced nor known to the stick; dropped"
        );
        Ok(())
    }

    fn malformed(&mut self, what: &str, src: Option<u16>) {
        self.driver.stats.zcl_malformed += 1;
        self.driver.ctx.stats.frame_bad();
        warn!(
            error = what,
            nwk = ?src,
            malformed = self.driver.stats.zcl_malformed,
            "Malformed Zigbee message"
        );
    }

    /// The IEEE address of `nwk`: from the table, else from the stick's address manager.
    async fn ieee_of(&mut self, nwk: u16) -> Result<Option<u64>, SessionError> {
        if let Some(ieee) = self.driver.table.get(&nwk) {
            return Ok(Some(*ieee));
        }
        let d = self
            .request(
                mt::sreq(
                    subsystem::UTIL,
                    mt::UTIL_ADDRMGR_NWK_ADDR_LOOKUP,
                    nwk.to_le_bytes().to_vec(),
                ),
                "UTIL_ADDRMGR_NWK_ADDR_LOOKUP",
            )
            .await?;
        let ieee = d
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .filter(|&i| i != 0 && i != u64::MAX);
        if let Some(ieee) = ieee {
            self.driver.learn(nwk, ieee);
        }
        Ok(ieee)
    }

    /// Sends one reading. Like every driver's, it carries `time_ms`: Zigbee reports have no
    /// timestamp of their own, so it is the time the driver received the frame.
    async fn emit(&mut self, device_id: &str, mut payload: Json) -> Result<(), SessionError> {
        let received_at_ms = now_unix_ms();
        if let Json::Object(map) = &mut payload {
            map.insert("device".into(), device_id.into());
            map.insert("time_ms".into(), received_at_ms.into());
        }
        let c = &self.driver.config;
        let reading = Reading {
            driver: c.name.clone(),
            device_id: device_id.to_owned(),
            topic: c.topic_for(device_id),
            route: c.route.clone(),
            content_type: Some(JSON.to_owned()),
            payload: payload.to_string().into_bytes(),
            received_at_ms,
        };
        self.sink
            .send(reading)
            .await
            .map_err(|_| SessionError::Stop(DriverError::SinkClosed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> DriverContext {
        let config = outpost_config::DriverConfig::Zigbee(ZigbeeConfig::default());
        DriverContext::new(&config, Arc::new(crate::NoHealth))
    }

    /// A scripted stick on the other end of a pipe: answers every frame it receives with
    /// `answer(frame)`, writes frames injected by the test, reports what it received.
    fn fake_stick(
        io: tokio::io::DuplexStream,
        answer: fn(&Frame) -> Vec<Frame>,
    ) -> (mpsc::Sender<Frame>, mpsc::Receiver<Frame>) {
        let (inject, mut injected) = mpsc::channel::<Frame>(16);
        let (seen_tx, seen) = mpsc::channel(64);
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(io);
            let mut decoder = Decoder::new();
            let mut buf = [0u8; 256];
            loop {
                let out = tokio::select! {
                    n = rd.read(&mut buf) => {
                        let n = n.unwrap_or(0);
                        if n == 0 { return; }
                        decoder.push(&buf[..n]);
                        let mut out = Vec::new();
                        while let Some(Ok(f)) = decoder.next_frame() {
                            out.extend(answer(&f));
                            let _ = seen_tx.send(f).await;
                        }
                        out
                    }
                    Some(f) = injected.recv() => vec![f],
                };
                for f in out {
                    if wr.write_all(&f.encode().unwrap()).await.is_err() {
                        return;
                    }
                }
            }
        });
        (inject, seen)
    }

    fn srsp(f: &Frame, data: Vec<u8>) -> Frame {
        Frame::new(CmdType::Srsp, f.subsystem(), f.cmd1, data)
    }

    /// A stick with a stored network: resumes it; knows nwk 0x4321 in its address manager.
    fn stored_network(f: &Frame) -> Vec<Frame> {
        use subsystem::*;
        let areq = |sub, id, data| Frame::new(CmdType::Areq, sub, id, data);
        match (f.subsystem(), f.cmd1, f.kind()) {
            (SYS, mt::SYS_RESET_REQ, Some(CmdType::Areq)) => {
                vec![areq(SYS, mt::SYS_RESET_IND, vec![0, 2, 1, 2, 7, 1])]
            }
            (SYS, mt::SYS_PING, _) => vec![srsp(f, vec![0x59, 0x01])],
            (SYS, mt::SYS_VERSION, _) => vec![srsp(f, vec![2, 1, 2, 7, 1])],
            (UTIL, mt::UTIL_GET_DEVICE_INFO, _) => vec![srsp(f, vec![0; 15])],
            (SYS, mt::SYS_OSAL_NV_READ, _) if f.data == [0x4F, 0x00, 0x00] => {
                vec![srsp(f, vec![0, 1, 1])]
            }
            (ZDO, mt::ZDO_STARTUP_FROM_APP, _) => vec![
                // The state change before the SRSP: must not be missed.
                areq(ZDO, mt::ZDO_STATE_CHANGE_IND, vec![mt::DEV_ZB_COORD]),
                srsp(f, vec![0]),
            ],
            (AF, mt::AF_REGISTER, _) => vec![srsp(f, vec![mt::STATUS_DUPLICATE])],
            (UTIL, mt::UTIL_ADDRMGR_NWK_ADDR_LOOKUP, _) if f.data == [0x21, 0x43] => {
                vec![srsp(f, 0x00124b00aabbccddu64.to_le_bytes().to_vec())]
            }
            (UTIL, mt::UTIL_ADDRMGR_NWK_ADDR_LOOKUP, _) => vec![srsp(f, vec![0; 8])],
            (ZDO, mt::ZDO_MGMT_PERMIT_JOIN_REQ, _) => vec![srsp(f, vec![0])],
            // On channel 15, PAN 0x2222 (the test's config says 11 / 0x1a62).
            (ZDO, mt::ZDO_EXT_NWK_INFO, _) => {
                let mut d = vec![0, 0, mt::DEV_ZB_COORD, 0x22, 0x22, 0xfe, 0xff];
                d.extend([0xdd; 8]);
                d.extend([0; 8]);
                d.push(15);
                vec![srsp(f, d)]
            }
            _ => vec![],
        }
    }

    fn incoming(src: u16, zcl: &[u8]) -> Frame {
        let mut d = vec![0, 0, 0x02, 0x04];
        d.extend_from_slice(&src.to_le_bytes());
        d.extend_from_slice(&[1, 1, 0, 99, 0, 0, 0, 0, 0, 0, zcl.len() as u8]);
        d.extend_from_slice(zcl);
        Frame::new(CmdType::Areq, subsystem::AF, mt::AF_INCOMING_MSG, d)
    }

    #[tokio::test(start_paused = true)]
    async fn resumes_then_serves_reports_lookups_and_permit_join() {
        let (port, stick) = tokio::io::duplex(4096);
        let (inject, mut seen) = fake_stick(stick, stored_network);
        let control = ZigbeeControl::default();
        let config = ZigbeeConfig {
            name: "zb".into(),
            permit_join_max: Duration::from_secs(30),
            ..ZigbeeConfig::default()
        };
        let mut driver = control.driver(config, ctx());
        let (sink, mut readings) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut session = Session::new(&mut driver, port, &sink, &stop);
        session.start().await.unwrap();
        let mut requests = Vec::new();
        while let Ok(f) = seen.try_recv() {
            requests.push((f.cmd0, f.cmd1));
        }
        // Resumed: no formation requests.
        assert_eq!(
            requests,
            [
                (0x41, 0x00),
                (0x21, 0x01),
                (0x21, 0x02),
                (0x27, 0x00),
                (0x21, 0x08),
                (0x25, 0x40),
                (0x24, 0x00),
                (0x25, 0x50)
            ]
        );
        // What the stick says, not the config.
        let details = session.driver.ctx.stats.snapshot().details;
        assert_eq!(details["channel"], "15");
        assert_eq!(details["pan_id"], "0x2222");
        assert_eq!(details["extended_pan_id"], "dddddddddddddddd");

        let mut queue = std::mem::replace(&mut session.driver.control, mpsc::channel(1).1);
        let serve = session.serve_with(&mut queue);
        tokio::pin!(serve);
        let test = async {
            // Unknown sender 0x4321 → looked up; unknown 0x9999 → dropped.
            inject
                .send(incoming(0x9999, &[0x18, 1, 0x0a, 0, 0, 0x29, 0x10, 0x00]))
                .await
                .unwrap();
            inject
                .send(incoming(0x4321, &[0x18, 2, 0x0a, 0, 0, 0x29, 0x66, 0x08]))
                .await
                .unwrap();
            let r = readings.recv().await.unwrap();
            assert_eq!(r.device_id, "zigbee-00124b00aabbccdd");
            assert_eq!(r.topic, "zigbee/zigbee-00124b00aabbccdd");
            let v: Json = serde_json::from_slice(&r.payload).unwrap();
            assert_eq!(v["temperature"], 21.5);
            assert_eq!(v["linkquality"], 99);
            assert_eq!(v["time_ms"], r.received_at_ms);
            let granted = control.permit_join(Duration::from_secs(100)).await;
            assert_eq!(granted, Ok(Duration::from_secs(30)));
            loop {
                let f = seen.recv().await.unwrap();
                if f.cmd1 == mt::ZDO_MGMT_PERMIT_JOIN_REQ {
                    assert_eq!(f.data, [0x0F, 0xFC, 0xFF, 30, 0]);
                    break;
                }
            }
        };
        tokio::select! {
            r = &mut serve => panic!("session ended: {r:?}"),
            () = test => {}
        }
        assert!(
            readings.try_recv().is_err(),
            "the unknown sender was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_srsp_ends_the_start_up_after_six_seconds() {
        let (port, stick) = tokio::io::duplex(4096);
        // Resets, then never answers.
        let (_inject, _seen) = fake_stick(stick, |f| {
            if f.kind() == Some(CmdType::Areq) {
                stored_network(f)
            } else {
                vec![]
            }
        });
        let (_tx, rx) = mpsc::channel(1);
        let mut driver = ZigbeeDriver::new(ZigbeeConfig::default(), ctx(), rx);
        let (sink, _readings) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut session = Session::new(&mut driver, port, &sink, &stop);
        let started = Instant::now();
        let err = session.start().await.unwrap_err();
        assert!(matches!(err, SessionError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("SYS_PING"), "{err}");
        assert_eq!(started.elapsed().as_secs(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_port_ends_the_session() {
        let (port, stick) = tokio::io::duplex(64);
        drop(stick);
        let (_tx, rx) = mpsc::channel(1);
        let mut driver = ZigbeeDriver::new(ZigbeeConfig::default(), ctx(), rx);
        let (sink, _readings) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut session = Session::new(&mut driver, port, &sink, &stop);
        assert!(session.start().await.is_err());
    }

    #[test]
    fn table_is_bounded() {
        let (_tx, rx) = mpsc::channel(1);
        let mut d = ZigbeeDriver::new(ZigbeeConfig::default(), ctx(), rx);
        for n in 0..(MAX_DEVICES as u16 + 10) {
            d.learn(n, u64::from(n) + 1);
        }
        assert_eq!(d.table.len(), MAX_DEVICES);
        assert!(!d.table.contains_key(&0));
        d.learn(5000, 1);
        d.learn(5000, 2);
        assert_eq!(d.table[&5000], 2);
    }

    #[tokio::test]
    async fn control_without_driver_is_no_driver() {
        let c = ZigbeeControl::default();
        assert_eq!(
            c.permit_join(Duration::from_secs(1)).await,
            Err(ControlError::NoDriver)
        );
        let driver = c.driver(ZigbeeConfig::default(), ctx());
        // Attached but not running: the queue accepts, nobody answers → Unavailable once the
        // driver is dropped.
        drop(driver);
        assert!(matches!(
            c.permit_join(Duration::from_secs(1)).await,
            Err(ControlError::Unavailable(_))
        ));
    }
}

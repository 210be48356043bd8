//! Kafka peers for the end-to-end tests and a plain consumer to check what reached them.
//!
//! - [`MockKafka`]: librdkafka's mock cluster in a child process (`kafka-mock`, a binary of this
//!   package) with fault injection: brokers down/up, request errors, round-trip delays.
//! - [`Tansu`]: a real Kafka-protocol broker (`tansu`, memory storage) behind a relay on an
//!   ephemeral loopback port: the network can be cut, the broker killed and restarted on the same
//!   address, for outage tests.
//! - [`consume`] / [`produce_plain`]: a blocking rdkafka client that reads or writes a topic
//!   without consumer-group coordination.
//!
//! Every peer listens on 127.0.0.1 only and dies with the test: on drop, and also when the test
//! process is killed (both children watch a pipe from the test and exit at its end of file).
//! Everything here is blocking; from async tests call it through `tokio::task::spawn_blocking`.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::find_command;

/// How to install `tansu`, for tests that need it and do not find it.
pub const TANSU_HINT: &str = "`tansu` (a Kafka-protocol broker) is not installed: run \
                              `bash scripts/ensure-tansu.sh` (a first build from source takes \
                              25-40 minutes; scripts/setup-test-deps.sh runs it too), or point \
                              TANSU_BIN at a tansu binary";

/// A binary of this package (`kafka-mock`): `$<env>` if set, else next to the test executable
/// (`<target>/<profile>/deps/<test>-<hash>` → `<target>/<profile>/<name>`). Cargo builds a
/// package's binaries before running its integration tests, so it is there for `cargo test`.
fn package_bin(name: &str, env: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env) {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot locate the test executable: {e}"));
    let mut dir = exe.parent().unwrap_or_else(|| Path::new("/"));
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{name} is not built: expected {}. Run `cargo build -p outpost-e2e --bins` (cargo test \
         builds it for this package's integration tests), or set {env}",
        bin.display()
    );
    bin
}

/// A librdkafka mock cluster (`kafka-mock` child process). Broker ids are `1..=brokers`; brokers
/// listen on 127.0.0.1. Killed on drop, and exits by itself when the test process dies.
pub struct MockKafka {
    child: Child,
    /// Commands go to the child's stdin; each gets one reply line on its stdout.
    control: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    bootstrap: String,
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers with the given `(topic, partitions)` created
    /// (replication factor 1). Panics if the helper cannot start.
    pub fn start(brokers: i32, topics: &[(&str, i32)]) -> MockKafka {
        let bin = package_bin("kafka-mock", "KAFKA_MOCK_BIN");
        let mut command = Command::new(&bin);
        command.arg("--brokers").arg(brokers.to_string());
        for (topic, partitions) in topics {
            command.arg("--topic").arg(format!("{topic}:{partitions}"));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdin = child.stdin.take().expect("kafka-mock stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("kafka-mock stdout"));
        let mut line = String::new();
        let read = stdout.read_line(&mut line).expect("read kafka-mock stdout");
        let bootstrap = match line.trim_end().strip_prefix("BOOTSTRAP ") {
            Some(servers) if read > 0 => servers.to_owned(),
            _ => {
                let status = child.wait();
                panic!(
                    "kafka-mock did not start (exit {status:?}, first line {line:?}); see its stderr above"
                )
            }
        };
        MockKafka {
            child,
            control: Mutex::new((stdin, stdout)),
            bootstrap,
        }
    }

    /// The `bootstrap.servers` list, `127.0.0.1:port,...`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Takes a broker down: its connections are closed and new ones refused. Leaders do not
    /// move, so partitions it leads are unavailable until [`MockKafka::up`].
    pub fn down(&self, broker: i32) {
        self.command(&format!("down {broker}"));
    }

    /// Brings a broker back up.
    pub fn up(&self, broker: i32) {
        self.command(&format!("up {broker}"));
    }

    /// The next `count` requests of `api` (`"Produce"`, `"InitProducerId"`, `"Metadata"`, ... or
    /// the api key number) fail with `error` (`"NotLeaderForPartition"`, `"RequestTimedOut"`,
    /// `"NotEnoughReplicas"`, `"OutOfOrderSequenceNumber"`, `"InvalidProducerEpoch"`,
    /// `"UnknownProducerId"`, ... — Kafka's `NOT_LEADER_FOR_PARTITION` spelling works too;
    /// `"Transport"` makes the broker drop the connection instead). See `src/bin/kafka-mock.rs`
    /// for the full lists. Panics on an unknown name.
    pub fn errors(&self, api: &str, count: usize, error: &str) {
        self.command(&format!("errors {api} {count} {error}"));
    }

    /// Drops the errors still pending for `api`.
    pub fn clear_errors(&self, api: &str) {
        self.command(&format!("clear {api}"));
    }

    /// Delays every response of `broker` by `delay`.
    pub fn rtt(&self, broker: i32, delay: Duration) {
        self.command(&format!("rtt {broker} {}", delay.as_millis()));
    }

    /// Creates a topic (replication factor 1).
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.command(&format!("topic {name} {partitions}"));
    }

    /// Metadata requests for `topic` answer `error` (`"TopicAuthorizationFailed"`, …;
    /// `"NoError"` clears it).
    pub fn topic_error(&self, topic: &str, error: &str) {
        self.command(&format!("topic-error {topic} {error}"));
    }

    /// Moves the leader of `topic`'s `partition` to `broker`, or (`None`) leaves it without
    /// one: its records wait until a leader is back.
    pub fn leader(&self, topic: &str, partition: i32, broker: Option<i32>) {
        let broker = broker.map_or("none".to_owned(), |b| b.to_string());
        self.command(&format!("leader {topic} {partition} {broker}"));
    }

    /// Sends one command and panics unless the reply is `OK`.
    fn command(&self, command: &str) {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let (stdin, stdout) = &mut *control;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("kafka-mock {command:?}: write: {e}"));
        let mut reply = String::new();
        match stdout.read_line(&mut reply) {
            Ok(0) => panic!("kafka-mock {command:?}: it exited"),
            Ok(_) if reply.trim_end() == "OK" => {}
            Ok(_) => panic!("kafka-mock {command:?}: {}", reply.trim_end()),
            Err(e) => panic!("kafka-mock {command:?}: read: {e}"),
        }
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tansu` binary: `$TANSU_BIN`, else `tansu` on `$PATH`. Panics with [`TANSU_HINT`].
pub fn tansu_bin() -> PathBuf {
    std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .or_else(|| find_command("tansu"))
        .unwrap_or_else(|| panic!("{TANSU_HINT}"))
}

/// The `tansu-sqlite` binary (tansu with SQLite storage, scripts/ensure-tansu.sh). Panics with
/// [`TANSU_HINT`].
pub fn tansu_sqlite_bin() -> PathBuf {
    find_command("tansu-sqlite").unwrap_or_else(|| panic!("{TANSU_HINT} (`tansu-sqlite`)"))
}

/// How a [`Tansu`] runs beyond the defaults of [`Tansu::start`].
#[derive(Debug, Default)]
pub struct TansuSetup {
    /// Run `tansu-sqlite` with SQLite storage in the broker's directory (the memory storage
    /// forgets SCRAM users). Data then survives [`Tansu::restart`].
    pub sqlite: bool,
    /// SCRAM users `(mechanism, name, password)`, mechanism `scram256` or `scram512`: created
    /// once the broker runs, which then restarts requiring authentication (`--authentication`)
    /// for good. Needs `sqlite`.
    pub scram_users: Vec<(&'static str, &'static str, &'static str)>,
    /// The address tansu advertises instead of the relay's, `host:port`: a TLS terminator in
    /// front of the relay.
    pub advertised: Option<String>,
}

/// Runs a program (tansu, stunnel) in the background and kills it (SIGKILL) when its stdin
/// reaches end of file, so it dies with the test process even when that is killed. The shell's
/// exit status is the program's.
/// Background jobs get /dev/null as stdin, hence the copy of the pipe on fd 3.
pub(crate) const TIED_WRAPPER: &str = r#"exec 3<&0
"$0" "$@" </dev/null 3<&- &
pid=$!
{ read -r line <&3; kill -9 "$pid" 2>/dev/null; } &
wait "$pid""#;

/// A real Kafka-protocol broker: `tansu broker` with memory storage, reached through a gate on
/// an ephemeral loopback port. Killed on drop, and when the test process dies.
///
/// Clients connect to [`Tansu::bootstrap`], a TCP relay inside the test process that forwards
/// to tansu on a private port (tansu advertises the relay's address, so every connection goes
/// through it). The relay lets a test cut the network without touching the broker
/// ([`Tansu::block`] / [`Tansu::unblock`]: data is kept), and keeps clients out after a
/// [`Tansu::restart`] until the topics exist again (otherwise a client retrying in the
/// background can write into a half-created topic).
///
/// Memory storage keeps nothing across [`Tansu::stop`] / [`Tansu::restart`]: a restarted broker
/// is empty (its topics are recreated, their records and offsets are gone), so an outage test
/// that restarts can only check what was produced after the restart; use [`Tansu::block`] to
/// check everything.
pub struct Tansu {
    bin: PathBuf,
    setup: TansuSetup,
    /// Set once the SCRAM users exist: the broker requires authentication from then on.
    authenticating: bool,
    /// The relay's port, the one clients use and tansu advertises.
    port: u16,
    /// Topics to (re)create after every start.
    topics: Mutex<Vec<(String, i32)>>,
    /// The wrapper shell and its stdin (closing it kills tansu); `None` while stopped.
    process: Option<(Child, ChildStdin)>,
    gate: Arc<Gate>,
    relay: Option<std::thread::JoinHandle<()>>,
    /// Holds `tansu.log` (stdout and stderr of every run), and is tansu's working directory so
    /// no stray `.env` file configures it.
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker, waits until it accepts connections and creates the given
    /// `(topic, partitions)`. Panics with [`TANSU_HINT`] if tansu is not installed.
    pub fn start(topics: &[(&str, i32)]) -> Tansu {
        Tansu::start_with(topics, TansuSetup::default())
    }

    /// [`Tansu::start`] with the given setup.
    pub fn start_with(topics: &[(&str, i32)], setup: TansuSetup) -> Tansu {
        assert!(
            setup.sqlite || setup.scram_users.is_empty(),
            "SCRAM users need the SQLite storage"
        );
        let bin = if setup.sqlite {
            tansu_sqlite_bin()
        } else {
            tansu_bin()
        };
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the tansu relay port");
        let port = listener.local_addr().expect("relay address").port();
        let gate = Arc::new(Gate::default());
        let relay = {
            let gate = Arc::clone(&gate);
            std::thread::Builder::new()
                .name("tansu-relay".into())
                .spawn(move || relay(&listener, &gate))
                .expect("spawn the tansu relay")
        };
        let dir = tempfile::Builder::new()
            .prefix("outpost-tansu-")
            .tempdir()
            .expect("tempdir for tansu");
        let mut tansu = Tansu {
            bin,
            setup,
            authenticating: false,
            port,
            topics: Mutex::new(
                topics
                    .iter()
                    .map(|(name, partitions)| ((*name).to_owned(), *partitions))
                    .collect(),
            ),
            process: None,
            gate,
            relay: Some(relay),
            dir,
        };
        tansu.launch();
        if !tansu.setup.scram_users.is_empty() {
            for (mechanism, name, password) in tansu.setup.scram_users.clone() {
                tansu.run_cli(&["user", "create", name, password, "--mechanism", mechanism]);
            }
            tansu.stop();
            tansu.authenticating = true;
            tansu.launch();
        }
        tansu
    }

    /// The `bootstrap.servers` value, `127.0.0.1:port`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the network: open connections are reset and new ones closed at once, while the
    /// broker keeps running and keeps its data.
    pub fn block(&self) {
        self.gate.close();
    }

    /// Lets clients in again after [`Tansu::block`] (not after [`Tansu::stop`]: use
    /// [`Tansu::restart`]).
    pub fn unblock(&self) {
        if self.process.is_some() {
            self.gate.open();
        }
    }

    /// Kills the broker (SIGKILL, like a crash) and waits until it is gone; clients are cut off
    /// at once. Does nothing if it is already stopped.
    pub fn stop(&mut self) {
        self.gate.close();
        if let Some((mut child, stdin)) = self.process.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts the broker again and recreates its topics, empty (memory storage: everything
    /// before the restart is lost); clients get in only once the topics exist. Stops it first if
    /// it is running.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Creates a topic now, and again after every [`Tansu::restart`].
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.run_topic_create(name, partitions);
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_owned(), partitions));
    }

    /// Everything tansu has written to stdout and stderr, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// Starts tansu on a fresh private port, creates the topics, then opens the gate.
    fn launch(&mut self) {
        let private = free_port();
        let listener_url = format!("tcp://127.0.0.1:{private}");
        let advertised_url = match &self.setup.advertised {
            Some(address) => format!("tcp://{address}"),
            None => format!("tcp://127.0.0.1:{}", self.port),
        };
        let storage = if self.setup.sqlite {
            "sqlite://tansu.db"
        } else {
            "memory://tansu/"
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open tansu.log");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(TIED_WRAPPER)
            .arg(&self.bin)
            .args(["broker", "--storage-engine", storage])
            .args(["--listener-url", &listener_url])
            .args(["--advertised-listener-url", &advertised_url])
            .args(self.authenticating.then_some("--authentication"))
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("CLUSTER_ID")
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup tansu.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let stdin = child.stdin.take().expect("tansu wrapper stdin");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, private));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tansu exited ({status}) before listening on {addr}:\n{}",
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some((child, stdin));
        self.gate.upstream.store(private, Ordering::SeqCst);
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // With authentication on, tansu's own client cannot get in: the topics were made (and
        // kept, SQLite storage) before.
        if !self.authenticating {
            for (name, partitions) in topics {
                self.run_topic_create(&name, partitions);
            }
        }
        self.gate.open();
    }

    /// `tansu topic create NAME --partitions N`.
    fn run_topic_create(&self, name: &str, partitions: i32) {
        self.run_cli(&[
            "topic",
            "create",
            name,
            "--partitions",
            &partitions.to_string(),
        ]);
    }

    /// `tansu ARGS --broker <private address>`, which must succeed within 30 s.
    fn run_cli(&self, args: &[&str]) {
        let url = format!(
            "tcp://127.0.0.1:{}",
            self.gate.upstream.load(Ordering::SeqCst)
        );
        let mut child = Command::new(&self.bin)
            .args(args)
            .args(["--broker", &url])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tansu {args:?}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for tansu") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`tansu {args:?}` did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = child.wait_with_output().expect("tansu output");
        assert!(
            status.success(),
            "`tansu {args:?}` failed ({status}):\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        self.gate.shutdown.store(true, Ordering::SeqCst);
        // Wake the relay's accept so it sees the shutdown flag.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}

/// The relay's state, shared between [`Tansu`] and its relay threads.
#[derive(Default)]
struct Gate {
    /// Set to stop the relay.
    shutdown: AtomicBool,
    /// tansu's private port.
    upstream: AtomicU16,
    /// `Some` while clients may connect: the open connections (client side, tansu side) by id.
    /// Checking and registering under one lock means no connection slips past a close.
    conns: Mutex<Option<HashMap<u64, (TcpStream, TcpStream)>>>,
    next_id: AtomicU64,
}

impl Gate {
    fn open(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.is_none() {
            *conns = Some(HashMap::new());
        }
    }

    /// Refuses new connections and resets the open ones.
    fn close(&self) {
        let open = self.conns.lock().unwrap_or_else(|e| e.into_inner()).take();
        for (client, upstream) in open.into_iter().flat_map(HashMap::into_values) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

/// Accepts clients and pipes each to tansu while the gate is open; closes them at once while it
/// is closed (the client sees a dropped connection and retries, as with a broker that is down).
fn relay(listener: &TcpListener, gate: &Arc<Gate>) {
    for client in listener.incoming() {
        if gate.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let mut conns = gate.conns.lock().unwrap_or_else(|e| e.into_inner());
        let Some(open) = conns.as_mut() else { continue };
        let upstream = gate.upstream.load(Ordering::SeqCst);
        let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)) else {
            continue;
        };
        let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        let id = gate.next_id.fetch_add(1, Ordering::Relaxed);
        open.insert(id, (client2, upstream2));
        drop(conns);
        let gate = Arc::clone(gate);
        let _ = std::thread::Builder::new()
            .name(format!("tansu-relay-{id}"))
            .spawn(move || {
                pipe(client, upstream);
                if let Some(open) = gate
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    open.remove(&id);
                }
            });
    }
}

/// Copies both ways until either side closes, then closes both.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut client_read), Ok(mut upstream_write)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Both);
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let _ = std::io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// One record read back by [`consume`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// Empty for a null payload.
    pub payload: Vec<u8>,
    /// In record order; a null header value reads as empty.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the Unix epoch (create or log-append time), if the record has one.
    pub timestamp: Option<i64>,
}

impl Consumed {
    /// The first header called `name`, as (lossy) UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    /// The payload as (lossy) UTF-8.
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Reads `topic` from the beginning of every partition until `expected` records have arrived or
/// `timeout` has passed, and returns what it read (the caller asserts on the count). Records of
/// one partition are in offset order; partitions interleave. No consumer group: partitions are
/// assigned directly, nothing is committed. With `read_committed`, records of open or aborted
/// transactions are not returned. To check that nothing *more* arrives, ask for `expected + 1`
/// with a short timeout. Blocking.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    read_committed: bool,
) -> Vec<Consumed> {
    consume_until(
        bootstrap,
        topic,
        expected,
        timeout,
        read_committed,
        None,
        &[],
    )
}

/// [`consume`] (read uncommitted) with extra librdkafka settings for the consumer: TLS and SASL
/// for a secured broker.
pub fn consume_with(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    client: &[(&str, &str)],
) -> Vec<Consumed> {
    consume_until(bootstrap, topic, expected, timeout, false, None, client)
}

/// [`consume`], also stopping once no record has arrived for `quiet` (when given).
fn consume_until(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    read_committed: bool,
    quiet: Option<Duration>,
    client: &[(&str, &str)],
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let mut config = ClientConfig::new();
    for (key, value) in client {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outpost-e2e-consume")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .expect("create Kafka consumer");

    // The topic may not be visible yet (auto-created by the first produce): retry until deadline.
    let partitions = loop {
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .ok()
            .and_then(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<i32>>())
            })
            .filter(|partitions| !partitions.is_empty());
        if let Some(partitions) = found {
            break partitions;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("add partition to assignment");
    }
    consumer.assign(&assignment).expect("assign partitions");

    let mut records = Vec::new();
    let mut last_record = Instant::now();
    while records.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || quiet.is_some_and(|q| last_record.elapsed() >= q) {
            break;
        }
        // Errors are transient here (a broker restarting, a partition not led yet): keep polling.
        if let Some(Ok(message)) = consumer.poll(left.min(Duration::from_millis(200))) {
            last_record = Instant::now();
            records.push(Consumed {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp: message.timestamp().to_millis(),
            });
        }
    }
    records
}

/// Everything `topic` holds, for a check that counts every record after producing has
/// stopped: reads from the beginning until no record has arrived for 10 s (or `timeout`).
/// Also returns the sum of the partitions' high watermarks as the broker reported them before
/// reading, so a caller can tell a broker whose watermark lags what it serves. Blocking.
pub fn consume_everything(bootstrap: &str, topic: &str, timeout: Duration) -> (Vec<Consumed>, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outpost-e2e-consume")
        .create()
        .expect("create Kafka consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut watermarks = 0;
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("partition watermarks");
            watermarks += high - low;
        }
    }
    let records = consume_until(
        bootstrap,
        topic,
        usize::MAX,
        timeout,
        false,
        Some(Duration::from_secs(10)),
        &[],
    );
    (records, watermarks)
}

/// Counts deliveries for [`produce_plain`].
#[derive(Default)]
struct DeliveryCount {
    delivered: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

impl ClientContext for DeliveryCount {}

impl ProducerContext for DeliveryCount {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e.to_string()),
        }
    }
}

/// Produces `n` records of `payload_size` bytes (`0..n` as the key, `i` repeated as payload,
/// no headers) with `acks=all` and waits for every delivery; panics if any fails or 30 s pass.
/// A sanity check that a broker takes writes. Blocking.
pub fn produce_plain(bootstrap: &str, topic: &str, n: usize, payload_size: usize) {
    let producer: BaseProducer<DeliveryCount> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create_with_context(DeliveryCount::default())
        .expect("create Kafka producer");
    for i in 0..n {
        let key = i.to_string();
        #[allow(clippy::cast_possible_truncation)] // the low byte is the point
        let payload = vec![i as u8; payload_size];
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // Queue full: serve delivery reports, then retry the same record.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(100));
                }
                Err((e, _)) => panic!("produce to {topic} at {bootstrap}: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("flush {n} records to {topic} at {bootstrap}: {e}"));
    let context = producer.context();
    let failed = context.failed.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        failed.is_empty(),
        "produce to {topic}: {} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        context.delivered.load(Ordering::Relaxed),
        n,
        "produce to {topic}: delivered"
    );
}

/// Sends `(gateway id, command)` records to `topic` the way a cloud backend does: with
/// confluent-kafka from PyPI (`tests/peers/send_commands.py`), keyed by gateway id, partitioned
/// like Java clients (`murmur2_random`). A `Value::String` is sent as raw text (a record that is
/// not JSON). Pauses `pause` after each record; returns each record's partition once Kafka
/// acknowledged it. Blocking; panics when a delivery fails.
pub fn send_commands(
    bootstrap: &str,
    topic: &str,
    records: &[(&str, serde_json::Value)],
    pause: Duration,
) -> Vec<i64> {
    send_commands_with(bootstrap, topic, records, pause, &[])
}

/// [`send_commands`] with further librdkafka `settings` for the backend's producer (TLS, SASL).
pub fn send_commands_with(
    bootstrap: &str,
    topic: &str,
    records: &[(&str, serde_json::Value)],
    pause: Duration,
    settings: &[(&str, &str)],
) -> Vec<i64> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let script = crate::manifest_dir().join("peers/send_commands.py");
    let settings: serde_json::Map<String, serde_json::Value> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let mut child = Command::new("python3")
        .arg(&script)
        .args([bootstrap, topic])
        .arg(pause.as_secs_f64().to_string())
        .arg(serde_json::Value::Object(settings).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run send_commands.py");
    let mut input = String::new();
    for (gateway, value) in records {
        let line = match value {
            serde_json::Value::String(raw) => serde_json::json!({ "gateway": gateway, "raw": raw }),
            other => serde_json::json!({ "gateway": gateway, "value": other }),
        };
        input.push_str(&format!("{line}\n"));
    }
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the commands");
    let out = child.wait_with_output().expect("send_commands.py");
    assert!(
        out.status.success(),
        "send_commands.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["partition"]
                .as_i64()
                .expect("a partition")
        })
        .collect()
}

//! A librdkafka mock Kafka cluster in its own process, driven over stdin, for the Kafka
//! end-to-end tests (`outpost_e2e::kafka::MockKafka` spawns it).
//!
//! Usage: `kafka-mock [--brokers N] [--topic NAME:PARTITIONS]...`. Brokers listen on 127.0.0.1
//! only (librdkafka binds the mock brokers to `INADDR_LOOPBACK`), on ephemeral ports. Broker ids
//! are 1..=N.
//!
//! Protocol: on start it prints `BOOTSTRAP <host:port,...>`, then reads one command per line from
//! stdin and answers each with `OK` or `ERR <message>`:
//!
//! - `down <broker_id>` / `up <broker_id>`: disconnect a broker and refuse connections / restore it
//!   (no leader change: partitions led by a down broker are unavailable until it is up again);
//! - `errors <api> <count> <error>`: the next `count` requests of `api` (a name such as `Produce`,
//!   `InitProducerId`, or the raw api key number) fail with `error` (e.g.
//!   `NotLeaderForPartition` or `NOT_LEADER_FOR_PARTITION`; `Transport` disconnects instead);
//! - `clear <api>`: drop the pending errors of `api`;
//! - `rtt <broker_id> <ms>`: delay every response of a broker;
//! - `topic <name> <partitions>`: create a topic;
//! - `topic-error <name> <error>`: metadata requests for the topic answer `error` (e.g.
//!   `TopicAuthorizationFailed`; `NoError` clears it);
//! - `leader <topic> <partition> <broker_id|none>`: move a partition's leader, or leave it
//!   without one (its records wait: a stuck partition).
//!
//! It exits at end of stdin, so it never outlives the test process that holds the pipe.

use std::io::{BufRead, Write};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn main() -> Result<(), String> {
    let mut brokers: i32 = 1;
    let mut topics: Vec<(String, i32)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--brokers" => {
                let v = value()?;
                brokers = v.parse().map_err(|e| format!("--brokers {v}: {e}"))?;
            }
            "--topic" => {
                let v = value()?;
                let (name, partitions) = v
                    .rsplit_once(':')
                    .ok_or(format!("--topic {v}: expected NAME:PARTITIONS"))?;
                let partitions = partitions
                    .parse()
                    .map_err(|e| format!("--topic {v}: {e}"))?;
                topics.push((name.to_owned(), partitions));
            }
            _ => {
                return Err(format!(
                    "unknown argument {arg}; usage: kafka-mock [--brokers N] [--topic NAME:PARTITIONS]..."
                ));
            }
        }
    }

    let cluster = MockCluster::new(brokers).map_err(|e| format!("mock cluster: {e}"))?;
    for (name, partitions) in &topics {
        create_topic(&cluster, name, *partitions)?;
    }
    let mut stdout = std::io::stdout().lock();
    let io_err = |e: std::io::Error| format!("stdout: {e}");
    writeln!(stdout, "BOOTSTRAP {}", cluster.bootstrap_servers()).map_err(io_err)?;
    stdout.flush().map_err(io_err)?;

    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        match command(&cluster, &line) {
            Ok(()) => writeln!(stdout, "OK"),
            Err(e) => writeln!(stdout, "ERR {e}"),
        }
        .map_err(io_err)?;
        stdout.flush().map_err(io_err)?;
    }
    Ok(())
}

fn command(cluster: &Cluster, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let int = |s: &str| s.parse::<i32>().map_err(|e| format!("{s:?}: {e}"));
    match words.as_slice() {
        ["down", id] => cluster.broker_down(int(id)?).map_err(|e| e.to_string()),
        ["up", id] => cluster.broker_up(int(id)?).map_err(|e| e.to_string()),
        ["errors", api, count, error] => {
            let api = api_key(api)?;
            let count = count
                .parse::<usize>()
                .map_err(|e| format!("{count:?}: {e}"))?;
            let error = error_code(error)?;
            cluster.request_errors(api, &vec![error; count]);
            Ok(())
        }
        ["clear", api] => {
            cluster.clear_request_errors(api_key(api)?);
            Ok(())
        }
        ["rtt", id, ms] => {
            let ms = ms.parse::<u64>().map_err(|e| format!("{ms:?}: {e}"))?;
            cluster
                .broker_round_trip_time(int(id)?, std::time::Duration::from_millis(ms))
                .map_err(|e| e.to_string())
        }
        ["topic", name, partitions] => create_topic(cluster, name, int(partitions)?),
        ["topic-error", name, error] => cluster
            .topic_error(name, error_code(error)?)
            .map_err(|e| e.to_string()),
        ["leader", topic, partition, broker] => {
            let broker = match *broker {
                "none" => None,
                id => Some(int(id)?),
            };
            cluster
                .partition_leader(topic, int(partition)?, broker)
                .map_err(|e| e.to_string())
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

/// Replication factor 1: the mock does not move leaders, so more replicas would only add
/// followers that nothing reads.
fn create_topic(cluster: &Cluster, name: &str, partitions: i32) -> Result<(), String> {
    cluster
        .create_topic(name, partitions, 1)
        .map_err(|e| format!("create topic {name}: {e}"))
}

const API_KEYS: &[(&str, RDKafkaApiKey)] = &[
    ("Produce", RDKafkaApiKey::Produce),
    ("Fetch", RDKafkaApiKey::Fetch),
    ("ListOffsets", RDKafkaApiKey::ListOffsets),
    ("Metadata", RDKafkaApiKey::Metadata),
    ("OffsetCommit", RDKafkaApiKey::OffsetCommit),
    ("OffsetFetch", RDKafkaApiKey::OffsetFetch),
    ("FindCoordinator", RDKafkaApiKey::FindCoordinator),
    ("JoinGroup", RDKafkaApiKey::JoinGroup),
    ("Heartbeat", RDKafkaApiKey::Heartbeat),
    ("LeaveGroup", RDKafkaApiKey::LeaveGroup),
    ("SyncGroup", RDKafkaApiKey::SyncGroup),
    ("SaslHandshake", RDKafkaApiKey::SaslHandshake),
    ("ApiVersion", RDKafkaApiKey::ApiVersion),
    ("InitProducerId", RDKafkaApiKey::InitProducerId),
    ("AddPartitionsToTxn", RDKafkaApiKey::AddPartitionsToTxn),
    ("AddOffsetsToTxn", RDKafkaApiKey::AddOffsetsToTxn),
    ("EndTxn", RDKafkaApiKey::EndTxn),
    ("TxnOffsetCommit", RDKafkaApiKey::TxnOffsetCommit),
    ("SaslAuthenticate", RDKafkaApiKey::SaslAuthenticate),
];

/// An api by name (case-insensitive) or by its key number.
fn api_key(name: &str) -> Result<RDKafkaApiKey, String> {
    let number = name.parse::<i16>().ok();
    API_KEYS
        .iter()
        .find(|(n, key)| n.eq_ignore_ascii_case(name) || number == Some(i16::from(*key)))
        .map(|(_, key)| *key)
        .ok_or_else(|| {
            let known: Vec<&str> = API_KEYS.iter().map(|(n, _)| *n).collect();
            format!("unknown api {name:?}; known: {}", known.join(", "))
        })
}

const ERRORS: &[(&str, RDKafkaRespErr)] = {
    use RDKafkaRespErr::*;
    &[
        ("NoError", RD_KAFKA_RESP_ERR_NO_ERROR),
        // Not retried by the producer, not an outage nor a poison error to the forwarder: an
        // unclassified failure, counted against the record's attempts.
        (
            "InvalidRequiredAcks",
            RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS,
        ),
        (
            "NotLeaderForPartition",
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ),
        ("LeaderNotAvailable", RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE),
        ("RequestTimedOut", RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT),
        ("NotEnoughReplicas", RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS),
        (
            "NotEnoughReplicasAfterAppend",
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        ),
        (
            "OutOfOrderSequenceNumber",
            RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        ),
        (
            "DuplicateSequenceNumber",
            RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER,
        ),
        (
            "InvalidProducerEpoch",
            RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH,
        ),
        ("UnknownProducerId", RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID),
        ("ProducerFenced", RD_KAFKA_RESP_ERR_PRODUCER_FENCED),
        ("NetworkException", RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION),
        ("BrokerNotAvailable", RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE),
        ("KafkaStorageError", RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR),
        ("MsgSizeTooLarge", RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE),
        (
            "UnknownTopicOrPart",
            RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        ),
        (
            "TopicAuthorizationFailed",
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        ),
        ("NotCoordinator", RD_KAFKA_RESP_ERR_NOT_COORDINATOR),
        (
            "CoordinatorNotAvailable",
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        ),
        (
            "CoordinatorLoadInProgress",
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
        ),
        (
            "ConcurrentTransactions",
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ),
        ("InvalidTxnState", RD_KAFKA_RESP_ERR_INVALID_TXN_STATE),
        // Not a broker error: the mock broker drops the connection instead of answering.
        ("Transport", RD_KAFKA_RESP_ERR__TRANSPORT),
    ]
};

/// An error by its `RDKafkaErrorCode` name (`NotLeaderForPartition`) or its Kafka protocol name
/// (`NOT_LEADER_FOR_PARTITION`); case and underscores are ignored.
fn error_code(name: &str) -> Result<RDKafkaRespErr, String> {
    let normalized = |s: &str| s.replace('_', "").to_ascii_lowercase();
    let wanted = normalized(name);
    ERRORS
        .iter()
        .find(|(n, _)| normalized(n) == wanted)
        .map(|(_, code)| *code)
        .ok_or_else(|| {
            let known: Vec<&str> = ERRORS.iter().map(|(n, _)| *n).collect();
            format!("unknown error {name:?}; known: {}", known.join(", "))
        })
}

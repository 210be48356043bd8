//! The Kafka test harness itself (`outpost_e2e::kafka`): records produced by a real client
//! come back from `consume` intact and in order, and the outage controls (`MockKafka::down/up`,
//! `Tansu::block/unblock`, `Tansu::stop/restart`) hold and then release a produce. Tests named
//! `tansu_*` need the `tansu` broker and fail (never skip) when it is missing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_e2e::kafka::{Consumed, MockKafka, Tansu, consume, produce_plain};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const WAIT: Duration = Duration::from_secs(30);

fn producer(bootstrap: &str, idempotent: bool) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", idempotent.to_string())
        .set("message.timeout.ms", "30000")
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .unwrap()
}

/// `consume` from a blocking thread, so the runtime keeps serving the test.
async fn consume_async(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || consume(&bootstrap, &topic, expected, timeout, false))
        .await
        .unwrap()
}

/// 100 keyed records with two headers each into a one-partition topic come back in order with
/// key, payload and headers intact; plain records into a three-partition topic all come back.
async fn roundtrip(bootstrap: &str) {
    let producer = producer(bootstrap, true);
    let mut deliveries = Vec::new();
    for i in 0..100 {
        let key = format!("key-{i}");
        let payload = format!("payload-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "seq",
                value: Some(&i.to_string()),
            })
            .insert(Header {
                key: "source",
                value: Some("harness"),
            });
        let record = FutureRecord::to("ordered")
            .key(&key)
            .payload(&payload)
            .headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in deliveries {
        let delivery = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        assert_eq!(delivery.partition, 0);
    }

    let records = consume_async(bootstrap, "ordered", 100, WAIT).await;
    assert_eq!(records.len(), 100, "consumed {records:?}");
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.topic, "ordered");
        assert_eq!(record.partition, 0);
        assert_eq!(record.offset, i64::try_from(i).unwrap());
        assert_eq!(record.key.as_deref(), Some(format!("key-{i}").as_bytes()));
        assert_eq!(record.payload_str(), format!("payload-{i}"));
        assert_eq!(record.header("seq"), Some(i.to_string()));
        assert_eq!(record.header("source").as_deref(), Some("harness"));
        assert_eq!(record.header("missing"), None);
        assert_eq!(
            record
                .headers
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["seq", "source"]
        );
        assert!(record.timestamp.is_some_and(|t| t > 0), "{record:?}");
    }
    // Nothing more than what was produced.
    let more = consume_async(bootstrap, "ordered", 101, Duration::from_secs(2)).await;
    assert_eq!(more.len(), 100);

    let bootstrap_owned = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || produce_plain(&bootstrap_owned, "spread", 30, 64))
        .await
        .unwrap();
    let records = consume_async(bootstrap, "spread", 30, WAIT).await;
    assert_eq!(records.len(), 30);
    let mut keys: Vec<usize> = records
        .iter()
        .map(|r| {
            String::from_utf8(r.key.clone().unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, (0..30).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.payload.len() == 64));
}

/// Produces `before`, runs `outage`, checks that a record sent during the outage is not
/// delivered within 2 s, runs `recover` and checks that it is then delivered. Returns what the
/// topic holds afterwards.
async fn outage(
    bootstrap: &str,
    outage: impl FnOnce(),
    recover: impl FnOnce(),
    expect_after: usize,
) -> Vec<Consumed> {
    let producer = producer(bootstrap, false);
    producer
        .send(
            FutureRecord::<str, str>::to("outage").payload("before"),
            WAIT,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    outage();
    let mut during = producer
        .send_result(FutureRecord::<str, str>::to("outage").payload("during"))
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut during)
            .await
            .is_err(),
        "a record was delivered (or failed) while the broker was down"
    );

    recover();
    tokio::time::timeout(WAIT, during)
        .await
        .expect("delivered within 30 s of recovery")
        .unwrap()
        .map_err(|(e, _)| e)
        .unwrap();
    consume_async(bootstrap, "outage", expect_after, WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_roundtrip_keeps_order_keys_and_headers() {
    let kafka = MockKafka::start(1, &[("ordered", 1), ("spread", 3)]);
    assert!(kafka.bootstrap().starts_with("127.0.0.1:"));
    roundtrip(kafka.bootstrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_broker_down_holds_produce_until_up() {
    let kafka = MockKafka::start(1, &[("outage", 1)]);
    let records = outage(kafka.bootstrap(), || kafka.down(1), || kafka.up(1), 2).await;
    let payloads: Vec<String> = records.iter().map(Consumed::payload_str).collect();
    assert_eq!(payloads, ["before", "during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_injected_produce_errors_are_retried() {
    let kafka = MockKafka::start(3, &[("flaky", 2)]);
    kafka.errors("Produce", 3, "NOT_LEADER_FOR_PARTITION");
    kafka.errors("Produce", 2, "RequestTimedOut");
    kafka.rtt(1, Duration::from_millis(20));
    let producer = producer(kafka.bootstrap(), true);
    producer
        .send(
            FutureRecord::<str, str>::to("flaky").key("k").payload("v"),
            WAIT,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    kafka.clear_errors("Produce");
    kafka.create_topic("late", 1);
    let records = consume_async(kafka.bootstrap(), "flaky", 1, WAIT).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload_str(), "v");
}

#[test]
#[should_panic(expected = "unknown error")]
fn mock_rejects_unknown_error_names() {
    let kafka = MockKafka::start(1, &[]);
    kafka.errors("Produce", 1, "NoSuchError");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_roundtrip_keeps_order_keys_and_headers() {
    let tansu = Tansu::start(&[("ordered", 1), ("spread", 3)]);
    roundtrip(&tansu.bootstrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_stop_holds_produce_until_restart() {
    let tansu = std::sync::Mutex::new(Tansu::start(&[("outage", 1)]));
    let bootstrap = tansu.lock().unwrap().bootstrap();
    let records = outage(
        &bootstrap,
        || tansu.lock().unwrap().stop(),
        || tansu.lock().unwrap().restart(),
        1,
    )
    .await;
    // Memory storage: the restart lost "before".
    let payloads: Vec<String> = records.iter().map(Consumed::payload_str).collect();
    assert_eq!(payloads, ["during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_block_holds_produce_until_unblock() {
    let tansu = Tansu::start(&[("outage", 1)]);
    let records = outage(&tansu.bootstrap(), || tansu.block(), || tansu.unblock(), 2).await;
    // The broker kept running: nothing is lost.
    let payloads: Vec<String> = records.iter().map(Consumed::payload_str).collect();
    assert_eq!(payloads, ["before", "during"]);
}

//! The server's session logic against a fake backend whose commits can be held, released or
//! failed, over in-memory streams, with a paused clock: acks only after the commit and in the
//! order of the publishes, QoS 2 retransmissions racing their original both ways, refusals,
//! persistent sessions across reconnects and a restart, wills, takeover.

mod client;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use self::client::{Client, Got, ack, connect, packet, publish, subscribe};
use crate::backend::StoreRefusal;
use crate::backend::fake::{FakeBackend, Verdict};
use crate::broker::Broker;
use crate::connection;
use crate::metrics::MqttMetrics;
use crate::settings::Settings;
use crate::store::Store;

const QUIET: Duration = Duration::from_millis(300);

struct Harness {
    broker: Arc<Broker>,
    backend: FakeBackend,
    stop: CancellationToken,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new(persist: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Self::open(dir, persist)
    }

    fn open(dir: tempfile::TempDir, persist: bool) -> Harness {
        Self::open_with(dir, persist, Settings::default())
    }

    fn with_settings(settings: Settings) -> Harness {
        Self::open_with(tempfile::tempdir().unwrap(), false, settings)
    }

    fn open_with(dir: tempfile::TempDir, persist: bool, settings: Settings) -> Harness {
        let backend = FakeBackend::default();
        let store = persist.then(|| Store::open(&dir.path().join("sessions.db")).unwrap());
        let broker = Broker::new(
            settings,
            Arc::new(backend.clone()),
            store,
            MqttMetrics::default(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&broker).housekeeping(stop.clone()));
        Harness {
            broker,
            backend,
            stop,
            dir,
        }
    }

    /// A restart: the broker is dropped and a new one opens the same files.
    async fn restart(self) -> Harness {
        self.stop.cancel();
        let Harness { broker, dir, .. } = self;
        drop(broker);
        // The writer thread ends once every handle is gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Self::open(dir, true)
    }

    /// Connects a client with `connect_bytes`; returns it and the CONNACK.
    async fn connect(&self, connect_bytes: &[u8]) -> (Client, Got) {
        let (mine, theirs) = tokio::io::duplex(1 << 20);
        let (broker, stop) = (Arc::clone(&self.broker), self.stop.clone());
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(theirs);
            let mut buf = BytesMut::new();
            let max = broker.settings.max_packet;
            if let Ok(Some(c)) = connection::read_first(&mut rd, &mut wr, &mut buf, max).await {
                let _ = connection::serve(c, rd, wr, buf, &[], &broker, true, stop).await;
            }
        });
        let mut client = Client::new(mine);
        client.send(connect_bytes).await;
        let connack = client.expect().await;
        assert_eq!(connack.kind(), 2, "CONNACK");
        (client, connack)
    }
}

fn v5_expiry(secs: u32) -> Vec<u8> {
    let mut p = vec![0x11];
    p.extend_from_slice(&secs.to_be_bytes());
    p
}

#[tokio::test(start_paused = true)]
async fn acks_wait_for_the_commit_and_keep_the_order_of_the_publishes() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(4, "c1", "dev", true, &[])).await;
    h.backend.hold();
    for pkid in 1..=3 {
        c.send(&publish(1, false, &format!("t/{pkid}"), pkid, None, b"x"))
            .await;
    }
    c.send(&publish(2, false, "t/4", 4, None, b"x")).await;
    assert_eq!(c.next(QUIET).await, None, "no ack before the commit");
    assert_eq!(h.backend.topics().len(), 0);
    h.backend.open(Verdict::Commit);
    let acks: Vec<(u8, u16)> = [
        c.expect().await,
        c.expect().await,
        c.expect().await,
        c.expect().await,
    ]
    .iter()
    .map(|g| (g.first, g.pkid()))
    .collect();
    assert_eq!(acks, [(0x40, 1), (0x40, 2), (0x40, 3), (0x50, 4)]);
    assert_eq!(h.backend.topics(), ["t/1", "t/2", "t/3", "t/4"]);
}

#[tokio::test(start_paused = true)]
async fn a_qos2_retransmission_during_the_commit_is_answered_after_it_and_stored_once() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(4, "c1", "dev", true, &[])).await;
    h.backend.hold();
    c.send(&publish(2, false, "t", 7, None, b"x")).await;
    c.send(&publish(2, true, "t", 7, None, b"x")).await;
    assert_eq!(c.next(QUIET).await, None);
    h.backend.open(Verdict::Commit);
    for _ in 0..2 {
        let g = c.expect().await;
        assert_eq!((g.first, g.pkid()), (0x50, 7));
    }
    // And after the commit, another retransmission: PUBREC, not stored.
    c.send(&publish(2, true, "t", 7, None, b"x")).await;
    assert_eq!(c.expect().await.first, 0x50);
    c.send(&ack(0x62, 7)).await;
    assert_eq!(c.expect().await.first, 0x70, "PUBCOMP");
    assert_eq!(h.backend.topics(), ["t"], "stored once");
}

#[tokio::test(start_paused = true)]
async fn a_retransmission_inherits_the_refusal_of_its_original() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(5, "c5", "dev", true, &[])).await;
    h.backend.hold();
    c.send(&publish(2, false, "t", 9, Some(&[]), b"x")).await;
    c.send(&publish(2, true, "t", 9, Some(&[]), b"x")).await;
    assert_eq!(c.next(QUIET).await, None);
    h.backend
        .open(Verdict::Refuse(StoreRefusal::Full("full".into())));
    for _ in 0..2 {
        let g = c.expect().await;
        assert_eq!(
            (g.first, g.pkid(), g.reason()),
            (0x50, 9, 0x97),
            "the same refusal"
        );
    }
    assert!(h.backend.topics().is_empty());
    // A retransmission after the refusal is a new attempt.
    h.backend.open(Verdict::Commit);
    c.send(&publish(2, true, "t", 9, Some(&[]), b"x")).await;
    let g = c.expect().await;
    assert_eq!((g.first, g.reason()), (0x50, 0));
    assert_eq!(h.backend.topics(), ["t"]);
}

#[tokio::test(start_paused = true)]
async fn mqtt_3_1_1_gets_no_ack_for_a_refused_publish_and_keeps_its_connection() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(4, "c1", "dev", true, &[])).await;
    h.backend
        .open(Verdict::Refuse(StoreRefusal::Full("full".into())));
    c.send(&publish(1, false, "t", 1, None, b"x")).await;
    c.send(&publish(2, false, "t", 2, None, b"x")).await;
    c.send(&packet(0xc0, &[])).await;
    assert_eq!(c.expect().await.first, 0xd0, "only the PINGRESP");
}

#[tokio::test(start_paused = true)]
async fn refusals_come_in_order_with_their_reason_codes() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(5, "c5", "dev", true, &[])).await;
    c.send(&publish(1, false, "$reserved/x", 1, Some(&[]), b"x"))
        .await;
    // Payload Format Indicator 1 with bytes that are not UTF-8.
    c.send(&publish(1, false, "t", 2, Some(&[0x01, 1]), b"\xff\xfe"))
        .await;
    c.send(&publish(
        1,
        false,
        "t",
        3,
        Some(&[0x01, 1]),
        "ok ✓".as_bytes(),
    ))
    .await;
    let got: Vec<(u16, u8)> = [c.expect().await, c.expect().await, c.expect().await]
        .iter()
        .map(|g| (g.pkid(), g.reason()))
        .collect();
    assert_eq!(got, [(1, 0x90), (2, 0x99), (3, 0)]);
    assert_eq!(h.backend.topics(), ["t"]);
}

#[tokio::test(start_paused = true)]
async fn delivered_qos_is_the_lower_of_the_publish_and_the_subscription() {
    let h = Harness::new(false);
    let (mut sub, _) = h.connect(&connect(4, "s", "dev", true, &[])).await;
    sub.send(&subscribe(1, "q/#", 2, false)).await;
    assert_eq!(sub.expect().await.body, [0, 1, 2], "SUBACK granted QoS 2");
    let (mut publisher, _) = h.connect(&connect(4, "p", "dev", true, &[])).await;
    publisher
        .send(&publish(0, false, "q/0", 0, None, b"0"))
        .await;
    publisher
        .send(&publish(1, false, "q/1", 5, None, b"1"))
        .await;
    assert_eq!(publisher.expect().await.first, 0x40);
    let a = sub.expect().await;
    let b = sub.expect().await;
    assert_eq!((a.topic(), a.qos()), ("q/0".to_owned(), 0));
    assert_eq!((b.topic(), b.qos()), ("q/1".to_owned(), 1));
}

#[tokio::test]
async fn a_persistent_session_keeps_its_subscription_and_queue_across_reconnects_and_a_restart() {
    let h = Harness::new(true);
    // MQTT 5, Clean Start, Session Expiry 300 s: a new session that outlives the connection.
    let (mut s, connack) = h
        .connect(&connect(5, "sleepy", "dev", true, &v5_expiry(300)))
        .await;
    assert_eq!(connack.body[0], 0, "no session present");
    s.send(&subscribe(1, "cmd/#", 1, true)).await;
    assert_eq!(s.expect().await.kind(), 9);
    s.send(&packet(0xe0, &[])).await; // normal DISCONNECT
    assert_eq!(s.next(Duration::from_millis(200)).await, None);
    // Published while it is away: acknowledged once its copy is on disk.
    let (mut p, _) = h.connect(&connect(5, "pub", "dev", true, &[])).await;
    for i in 1..=3 {
        p.send(&publish(1, false, &format!("cmd/{i}"), i, Some(&[]), b"go"))
            .await;
        assert_eq!(p.expect().await.reason(), 0);
    }
    // Back: session present, the queued messages arrive; two are acknowledged.
    let (mut s, connack) = h
        .connect(&connect(5, "sleepy", "dev", false, &v5_expiry(300)))
        .await;
    assert_eq!(connack.body[..2], [1, 0], "session present");
    let mut got = Vec::new();
    for _ in 0..3 {
        let g = s.expect().await;
        assert_eq!(g.qos(), 1);
        got.push((g.topic(), g.pkid()));
    }
    assert_eq!(
        got.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["cmd/1", "cmd/2", "cmd/3"]
    );
    s.send(&ack(0x40, got[0].1)).await;
    s.send(&ack(0x40, got[1].1)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s); // the network goes away
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A restart of the gateway: the session, its subscription and the unacknowledged message
    // are still there; it is resent with DUP and its original packet identifier.
    let h = h.restart().await;
    let (mut s, connack) = h
        .connect(&connect(5, "sleepy", "dev", false, &v5_expiry(300)))
        .await;
    assert_eq!(
        connack.body[..2],
        [1, 0],
        "session present after the restart"
    );
    let g = s.expect().await;
    assert_eq!(
        (g.topic(), g.pkid(), g.dup()),
        ("cmd/3".to_owned(), got[2].1, true)
    );
    s.send(&ack(0x40, g.pkid())).await;
    // The subscription survived too.
    let (mut p, _) = h.connect(&connect(5, "pub", "dev", true, &[])).await;
    p.send(&publish(1, false, "cmd/4", 1, Some(&[]), b"go"))
        .await;
    assert_eq!(p.expect().await.reason(), 0);
    assert_eq!(s.expect().await.topic(), "cmd/4");
    // Clean Start discards the session.
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut s, connack) = h
        .connect(&connect(5, "sleepy", "dev", true, &v5_expiry(300)))
        .await;
    assert_eq!(connack.body[0], 0);
    p.send(&publish(1, false, "cmd/5", 2, Some(&[]), b"go"))
        .await;
    assert_eq!(p.expect().await.reason(), 0);
    assert_eq!(s.next(QUIET).await, None, "no subscription any more");
}

#[tokio::test(start_paused = true)]
async fn a_will_waits_for_its_delay_and_a_reconnect_in_time_cancels_it() {
    let h = Harness::new(false);
    let (mut watcher, _) = h.connect(&connect(4, "w", "dev", true, &[])).await;
    watcher.send(&subscribe(1, "gone/#", 0, false)).await;
    watcher.expect().await;
    // MQTT 5 CONNECT with a will: delay 5 s, session expiry 60 s.
    let will_connect = |clean: bool| {
        let mut b = Vec::new();
        client::put_str(&mut b, "MQTT");
        b.extend_from_slice(&[5, 0xc4 | if clean { 0x02 } else { 0 }, 0, 60]);
        let props = v5_expiry(60);
        client::varint(&mut b, props.len());
        b.extend_from_slice(&props);
        client::put_str(&mut b, "willing");
        b.extend_from_slice(&[5, 0x18, 0, 0, 0, 5]); // will properties: delay 5 s
        client::put_str(&mut b, "gone/willing");
        client::put_str(&mut b, "bye");
        client::put_str(&mut b, "dev");
        client::put_str(&mut b, "secret");
        packet(0x10, &b)
    };
    let (c, _) = h.connect(&will_connect(true)).await;
    drop(c); // abnormal end
    assert_eq!(
        watcher.next(Duration::from_secs(3)).await,
        None,
        "not before its delay"
    );
    assert_eq!(watcher.expect().await.topic(), "gone/willing");
    // Again, but the client is back before the delay: no will.
    let (c, _) = h.connect(&will_connect(false)).await;
    drop(c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_c, connack) = h.connect(&will_connect(false)).await;
    assert_eq!(connack.body[0], 1, "session present");
    assert_eq!(watcher.next(Duration::from_secs(10)).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let h = Harness::new(false);
    let (mut first, _) = h.connect(&connect(5, "same", "dev", true, &[])).await;
    let (_second, _) = h.connect(&connect(5, "same", "dev", true, &[])).await;
    let g = first.expect().await;
    assert_eq!(
        (g.first, g.body[0]),
        (0xe0, 0x8e),
        "DISCONNECT Session taken over"
    );
    assert_eq!(first.next(QUIET).await, None, "closed");
}

/// A takeover that wins the race against the old connection's last publishes (a client that
/// publishes, disconnects and reconnects at once with the same client id): what the old
/// connection received is committed, QoS 0 included, before it closes.
#[tokio::test(start_paused = true)]
async fn publishes_received_before_a_takeover_are_still_stored() {
    let h = Harness::new(false);
    let (mut first, _) = h.connect(&connect(5, "same", "dev", true, &[])).await;
    h.backend.hold();
    first
        .send(&publish(0, false, "t/0", 0, Some(&[]), b"x"))
        .await;
    first
        .send(&publish(1, false, "t/1", 1, Some(&[]), b"x"))
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.backend.held(), 2, "both publishes are committing");
    // The takeover's CONNACK waits for the old connection to let go of the session, which it
    // does once its commits are done.
    let second = connect(5, "same", "dev", true, &[]);
    let ((_second, connack), ()) = tokio::join!(h.connect(&second), async {
        tokio::time::sleep(QUIET).await;
        h.backend.open(Verdict::Commit);
    });
    assert_eq!(connack.body[1], 0, "CONNACK success");
    let g = first.expect().await;
    assert_eq!(
        (g.first, g.pkid()),
        (0x40, 1),
        "the old connection's PUBACK"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.backend.topics(), ["t/0", "t/1"]);
}

/// A takeover also reads what the old client had sent but its connection had not read yet (here
/// its window was full): a client that publishes, disconnects and reconnects with the same client
/// id at once loses nothing even when the new CONNECT is handled first.
#[tokio::test(start_paused = true)]
async fn a_takeover_still_reads_what_the_old_client_had_sent() {
    let h = Harness::with_settings(Settings {
        max_inflight_in: 1,
        ..Settings::default()
    });
    let (mut first, _) = h.connect(&connect(5, "same", "dev", true, &[])).await;
    h.backend.hold();
    first
        .send(&publish(1, false, "t/0", 1, Some(&[]), b"x"))
        .await;
    first
        .send(&publish(0, false, "t/1", 0, Some(&[]), b"x"))
        .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        h.backend.held(),
        1,
        "a full window: the QoS 0 publish is not read yet"
    );
    let second = connect(5, "same", "dev", true, &[]);
    let ((_second, connack), ()) = tokio::join!(h.connect(&second), async {
        tokio::time::sleep(QUIET).await;
        h.backend.open(Verdict::Commit);
    });
    assert_eq!(connack.body[1], 0, "CONNACK success");
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.backend.topics(), ["t/0", "t/1"]);
}

/// A client that closes its connection right after publishing (no DISCONNECT, no wait for
/// acks): what it sent still reaches the outbox, QoS 0 included.
#[tokio::test(start_paused = true)]
async fn publishes_sent_before_the_client_closes_are_still_stored() {
    let h = Harness::new(false);
    let (mut c, _) = h.connect(&connect(4, "c1", "dev", true, &[])).await;
    h.backend.hold();
    c.send(&publish(0, false, "t/0", 0, None, b"x")).await;
    c.send(&publish(1, false, "t/1", 1, None, b"x")).await;
    tokio::time::sleep(QUIET).await;
    drop(c);
    tokio::time::sleep(QUIET).await;
    h.backend.open(Verdict::Commit);
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.backend.topics(), ["t/0", "t/1"]);
}

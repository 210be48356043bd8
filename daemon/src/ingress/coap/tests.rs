//! The endpoint's protocol behaviour over a real loopback socket, against a fake backend (so
//! commits can be held, refused or failed at will). The real registry and outbox are exercised
//! by `tests/tests/coap.rs` against the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use outpost_sync::{AppendError, FullReason};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, Denied, Event};
use super::message::{self, Block};
use super::{CoapMetrics, CoapSettings, network, server};
use crate::ingress::IngestRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    Ok,
    Full,
    Storage,
}

#[derive(Default)]
struct FakeState {
    devices: HashMap<String, Result<(), Denied>>,
    stored: Vec<(String, String, IngestRecord)>,
    events: Vec<(String, Event)>,
    commit: Option<Commit>,
}

/// A backend whose commits can be held until the test releases them.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// When `Some`, every commit waits for a permit.
    hold: Option<Arc<Semaphore>>,
}

impl Fake {
    fn new() -> Self {
        let mut state = FakeState::default();
        state.devices.insert("dev1".into(), Ok(()));
        state.devices.insert(
            "off".into(),
            Err(Denied::Unauthorized("device is disabled".into())),
        );
        state.devices.insert(
            "nocoap".into(),
            Err(Denied::Forbidden("device may not use this protocol".into())),
        );
        Self {
            state: Arc::new(Mutex::new(state)),
            hold: None,
        }
    }

    fn held() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (
            Self {
                hold: Some(Arc::clone(&gate)),
                ..Self::new()
            },
            gate,
        )
    }

    fn stored(&self) -> Vec<(String, String, IngestRecord)> {
        self.state.lock().unwrap().stored.clone()
    }

    fn events(&self) -> Vec<(String, Event)> {
        self.state.lock().unwrap().events.clone()
    }

    fn set_commit(&self, c: Commit) {
        self.state.lock().unwrap().commit = Some(c);
    }
}

impl Backend for Fake {
    async fn identify(&self, device: &str) -> Result<(), Denied> {
        let state = self.state.lock().unwrap();
        state
            .devices
            .get(device)
            .cloned()
            .unwrap_or_else(|| Err(Denied::Unauthorized("unknown device".into())))
    }

    fn observe(&self, device: &str, event: Event) {
        self.state
            .lock()
            .unwrap()
            .events
            .push((device.to_owned(), event));
    }

    async fn submit(
        &self,
        device: &str,
        route: &str,
        records: Vec<IngestRecord>,
    ) -> Result<Vec<u64>, AppendError> {
        if let Some(gate) = &self.hold {
            gate.acquire().await.unwrap().forget();
        }
        let mut state = self.state.lock().unwrap();
        match state.commit.unwrap_or(Commit::Ok) {
            Commit::Ok => {}
            Commit::Full => {
                return Err(AppendError::Full {
                    route: route.into(),
                    reason: FullReason::ByteCap,
                });
            }
            Commit::Storage => return Err(AppendError::Storage("disk I/O error".into())),
        }
        let first = state.stored.len() as u64;
        let n = records.len() as u64;
        for r in records {
            state.stored.push((device.to_owned(), route.to_owned(), r));
        }
        Ok((first..first + n).collect())
    }

    fn registry(&self) -> Option<&crate::registry::Registry> {
        None
    }
}

fn settings() -> CoapSettings {
    CoapSettings {
        plain_networks: network::parse_all(&["127.0.0.0/8"]).unwrap(),
        route: "default".into(),
        max_body: 1024,
        max_exchanges: 64,
        max_in_flight: 16,
        budget: None,
    }
}

struct Harness {
    server: SocketAddr,
    client: UdpSocket,
    metrics: CoapMetrics,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(fake: Fake, settings: CoapSettings) -> Harness {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = socket.local_addr().unwrap();
    let metrics = CoapMetrics::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        socket,
        fake,
        settings,
        metrics.clone(),
        stop.clone(),
    ));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    Harness {
        server,
        client,
        metrics,
        stop,
        task,
    }
}

impl Harness {
    async fn send(&self, bytes: &[u8]) {
        self.client.send_to(bytes, self.server).await.unwrap();
    }

    async fn recv(&self) -> Packet {
        let bytes = self.recv_bytes().await.expect("a response within 5 s");
        Packet::from_bytes(&bytes).unwrap()
    }

    async fn recv_bytes(&self) -> Option<Vec<u8>> {
        self.recv_within(Duration::from_secs(5)).await
    }

    async fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(wait, self.client.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            Ok(Err(e)) => panic!("recv: {e}"),
            Err(_) => None,
        }
    }

    async fn exchange(&self, request: &Packet) -> Packet {
        self.send(&request.to_bytes().unwrap()).await;
        let response = self.recv().await;
        assert_eq!(response.header.message_id, request.header.message_id);
        assert_eq!(response.get_token(), request.get_token());
        response
    }
}

fn request(kind: MessageType, method: RequestType, mid: u16, path: &str, query: &[&str]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![0xA, (mid & 0xFF) as u8]);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    for q in query {
        p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
    }
    p
}

fn post(mid: u16, path: &str, device: &str, cf: Option<u16>, body: &[u8]) -> Packet {
    let query = format!("d={device}");
    let mut p = request(
        MessageType::Confirmable,
        RequestType::Post,
        mid,
        path,
        &[&query],
    );
    if let Some(cf) = cf {
        p.add_option(
            CoapOption::ContentFormat,
            message::uint_bytes(u32::from(cf)),
        );
    }
    p.payload = body.to_vec();
    p
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn option_u32(p: &Packet, number: u16) -> Option<u32> {
    message::uint_option(p, number, "option", 4).unwrap()
}

fn diagnostic(p: &Packet) -> String {
    String::from_utf8(p.payload.clone()).unwrap()
}

#[tokio::test]
async fn con_post_is_acked_2_01_after_the_commit_and_put_2_04() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    let r = h
        .exchange(&post(
            1,
            "t/room/1/temp",
            "dev1",
            Some(50),
            br#"{"t":21.5}"#,
        ))
        .await;
    assert_eq!(r.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code(&r), ResponseType::Created);
    let stored = fake.stored();
    assert_eq!(stored.len(), 1);
    let (device, route, record) = &stored[0];
    assert_eq!((device.as_str(), route.as_str()), ("dev1", "default"));
    assert_eq!(record.topic, "room/1/temp");
    assert_eq!(record.content_type.as_deref(), Some("application/json"));
    assert_eq!(&record.payload[..], br#"{"t":21.5}"#);

    let mut put = post(2, "t/x", "dev1", Some(0), b"hello");
    put.header.code = MessageClass::Request(RequestType::Put);
    assert_eq!(code(&h.exchange(&put).await), ResponseType::Changed);
    // No Content-Format: an octet stream.
    assert_eq!(
        code(&h.exchange(&post(3, "t/x", "dev1", None, &[0, 1, 2])).await),
        ResponseType::Created
    );
    let stored = fake.stored();
    assert_eq!(stored[1].2.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        stored[2].2.content_type.as_deref(),
        Some("application/octet-stream")
    );
    // A JSON array is a batch.
    assert_eq!(
        code(
            &h.exchange(&post(4, "t/x", "dev1", Some(50), br#"[{"a":1},{"a":2}]"#))
                .await
        ),
        ResponseType::Created
    );
    assert_eq!(fake.stored().len(), 5);
    assert_eq!(h.metrics.records.get(), 5);
}

#[tokio::test]
async fn non_post_is_stored_without_a_response() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    let mut p = post(10, "t/a", "dev1", Some(50), br#"{"v":1}"#);
    p.header.set_type(MessageType::NonConfirmable);
    h.send(&p.to_bytes().unwrap()).await;
    // A later CON proves the NON was processed first (one socket, in order) without an answer.
    let r = h
        .exchange(&post(11, "t/a", "dev1", Some(50), br#"{"v":2}"#))
        .await;
    assert_eq!(code(&r), ResponseType::Created);
    assert_eq!(h.recv_within(Duration::from_millis(200)).await, None);
    assert_eq!(fake.stored().len(), 2);
    // A repeated NON is ignored.
    h.send(&p.to_bytes().unwrap()).await;
    h.exchange(&post(12, "t/a", "dev1", Some(50), br#"{"v":3}"#))
        .await;
    assert_eq!(fake.stored().len(), 3);
    assert_eq!(h.metrics.duplicates.get(), 1);
}

#[tokio::test]
async fn retransmission_in_flight_is_stored_once_and_every_copy_gets_the_same_ack() {
    let (fake, gate) = Fake::held();
    let h = start(fake.clone(), settings()).await;
    let bytes = post(0x4242, "t/a", "dev1", Some(50), br#"{"v":1}"#)
        .to_bytes()
        .unwrap();
    h.send(&bytes).await;
    h.send(&bytes).await;
    // Nothing is acknowledged before the commit.
    assert_eq!(h.recv_within(Duration::from_millis(300)).await, None);
    gate.add_permits(10);
    let first = h.recv_bytes().await.unwrap();
    let second = h.recv_bytes().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        code(&Packet::from_bytes(&first).unwrap()),
        ResponseType::Created
    );
    // After completion a copy gets the cached ACK.
    h.send(&bytes).await;
    assert_eq!(h.recv_bytes().await.unwrap(), first);
    assert_eq!(fake.stored().len(), 1);
    assert_eq!(h.metrics.duplicates.get(), 2);
}

#[tokio::test]
async fn refusals_of_address_and_device() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    for (mid, device, expected) in [
        (1, "nobody", ResponseType::Unauthorized),
        (2, "off", ResponseType::Unauthorized),
        (3, "nocoap", ResponseType::Forbidden),
    ] {
        let r = h.exchange(&post(mid, "t/a", device, Some(50), b"{}")).await;
        assert_eq!(code(&r), expected, "{device}");
        assert!(diagnostic(&r).contains(device), "{}", diagnostic(&r));
    }
    let mut no_device = request(MessageType::Confirmable, RequestType::Post, 4, "t/a", &[]);
    no_device.payload = b"{}".to_vec();
    let r = h.exchange(&no_device).await;
    assert_eq!(code(&r), ResponseType::Unauthorized);
    assert!(diagnostic(&r).contains("d=<device id>"));
    assert!(fake.stored().is_empty());
    assert!(fake.events().contains(&("nocoap".into(), Event::Refused)));

    let mut elsewhere = settings();
    elsewhere.plain_networks = network::parse_all(&["10.0.0.0/8", "::1"]).unwrap();
    let h = start(fake.clone(), elsewhere).await;
    let r = h.exchange(&post(5, "t/a", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::Unauthorized);
    assert!(
        diagnostic(&r).contains("plain_networks"),
        "{}",
        diagnostic(&r)
    );
    assert!(fake.stored().is_empty());
}

#[tokio::test]
async fn resource_method_and_format_errors() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    let r = h.exchange(&post(1, "nope", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::NotFound);
    let r = h.exchange(&post(2, "t", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::NotFound);
    let get = request(
        MessageType::Confirmable,
        RequestType::Get,
        3,
        "t/a",
        &["d=dev1"],
    );
    assert_eq!(
        code(&h.exchange(&get).await),
        ResponseType::MethodNotAllowed
    );
    let delete = request(
        MessageType::Confirmable,
        RequestType::Delete,
        4,
        "t/a",
        &["d=dev1"],
    );
    assert_eq!(
        code(&h.exchange(&delete).await),
        ResponseType::MethodNotAllowed
    );
    let r = h.exchange(&post(5, "t/a", "dev1", Some(41), b"<x/>")).await;
    assert_eq!(code(&r), ResponseType::UnsupportedContentFormat);
    let r = h
        .exchange(&post(6, "t/a", "dev1", Some(50), b"{\"t\": "))
        .await;
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert!(diagnostic(&r).starts_with("body"), "{}", diagnostic(&r));
    let r = h
        .exchange(&post(
            7,
            "t/a",
            "dev1",
            Some(110),
            br#"[{"n":"x","v":"not a number"}]"#,
        ))
        .await;
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert!(diagnostic(&r).contains("/0"), "{}", diagnostic(&r));
    let r = h.exchange(&post(8, "t/a/+", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert!(diagnostic(&r).starts_with("topic"), "{}", diagnostic(&r));
    assert!(fake.stored().is_empty());
    assert!(
        fake.events()
            .iter()
            .filter(|(_, e)| *e == Event::Malformed)
            .count()
            >= 4
    );
    // An unknown method code is answered 4.05 too.
    let mut odd = request(
        MessageType::Confirmable,
        RequestType::Get,
        9,
        "t/a",
        &["d=dev1"],
    );
    odd.header.code = MessageClass::Reserved(0x09);
    assert_eq!(
        code(&h.exchange(&odd).await),
        ResponseType::MethodNotAllowed
    );
}

#[tokio::test]
async fn too_large_body_gets_4_13_with_size1() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    let r = h
        .exchange(&post(1, "t/a", "dev1", Some(42), &[7u8; 1025]))
        .await;
    assert_eq!(code(&r), ResponseType::RequestEntityTooLarge);
    assert_eq!(option_u32(&r, message::SIZE1), Some(1024));
    assert!(fake.stored().is_empty());
}

#[tokio::test]
async fn outbox_full_is_5_03_with_max_age_and_storage_error_5_00() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    fake.set_commit(Commit::Full);
    let r = h.exchange(&post(1, "t/a", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::ServiceUnavailable);
    assert_eq!(option_u32(&r, message::MAX_AGE), Some(5));
    fake.set_commit(Commit::Storage);
    let r = h.exchange(&post(2, "t/a", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::InternalServerError);
    fake.set_commit(Commit::Ok);
    assert_eq!(
        code(&h.exchange(&post(3, "t/a", "dev1", Some(50), b"{}")).await),
        ResponseType::Created
    );
}

#[tokio::test]
async fn discovery_over_con_and_non() {
    let h = start(Fake::new(), settings()).await;
    let get = request(
        MessageType::Confirmable,
        RequestType::Get,
        1,
        ".well-known/core",
        &[],
    );
    let r = h.exchange(&get).await;
    assert_eq!(code(&r), ResponseType::Content);
    assert_eq!(option_u32(&r, message::CONTENT_FORMAT), Some(40));
    assert!(diagnostic(&r).contains(r#"</t>;rt="outpost.readings";if="core.b""#));
    let mut non = request(
        MessageType::NonConfirmable,
        RequestType::Get,
        2,
        ".well-known/core",
        &[],
    );
    non.set_token(vec![1, 2, 3, 4]);
    h.send(&non.to_bytes().unwrap()).await;
    let r = h.recv().await;
    assert_eq!(r.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(r.get_token(), &[1, 2, 3, 4]);
    assert_eq!(code(&r), ResponseType::Content);
    // A copy of the NON is ignored, not answered again.
    h.send(&non.to_bytes().unwrap()).await;
    assert_eq!(h.recv_within(Duration::from_millis(200)).await, None);
    let mut json_please = request(
        MessageType::Confirmable,
        RequestType::Get,
        4,
        ".well-known/core",
        &[],
    );
    json_please.add_option(CoapOption::Accept, message::uint_bytes(50));
    assert_eq!(
        code(&h.exchange(&json_please).await),
        ResponseType::NotAcceptable
    );
    let post = request(
        MessageType::Confirmable,
        RequestType::Post,
        3,
        ".well-known/core",
        &[],
    );
    assert_eq!(
        code(&h.exchange(&post).await),
        ResponseType::MethodNotAllowed
    );
}

#[tokio::test]
async fn block1_upload_in_order_then_out_of_order() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    let body: Vec<u8> = format!("{{\"samples\":[{}]}}", vec!["1"; 30].join(",")).into_bytes();
    let chunks: Vec<&[u8]> = body.chunks(16).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let mut p = post(100 + i as u16, "t/bulk", "dev1", Some(50), chunk);
        let block = Block {
            num: i as u32,
            more: i < last,
            szx: 0,
        };
        p.add_option(CoapOption::Block1, block.encode());
        if i == 0 {
            p.add_option(CoapOption::Size1, message::uint_bytes(body.len() as u32));
        }
        let r = h.exchange(&p).await;
        let echoed = Block::from_request(&r, message::BLOCK1, "Block1").unwrap();
        assert_eq!(echoed, Some(block));
        if i < last {
            assert_eq!(code(&r), ResponseType::Continue);
            assert!(
                fake.stored().is_empty(),
                "nothing stored before the last block"
            );
        } else {
            assert_eq!(code(&r), ResponseType::Created);
        }
    }
    let stored = fake.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].2.payload, body);

    // Skipping block 1 is 4.08.
    let mut p = post(200, "t/bulk", "dev1", Some(50), &body[..16]);
    p.add_option(
        CoapOption::Block1,
        Block {
            num: 0,
            more: true,
            szx: 0,
        }
        .encode(),
    );
    assert_eq!(code(&h.exchange(&p).await), ResponseType::Continue);
    let mut p = post(201, "t/bulk", "dev1", Some(50), &body[32..48]);
    p.add_option(
        CoapOption::Block1,
        Block {
            num: 2,
            more: true,
            szx: 0,
        }
        .encode(),
    );
    assert_eq!(
        code(&h.exchange(&p).await),
        ResponseType::RequestEntityIncomplete
    );
    // Announcing a body over the limit is 4.13 at once.
    let mut p = post(202, "t/bulk", "dev1", Some(50), &body[..16]);
    p.add_option(
        CoapOption::Block1,
        Block {
            num: 0,
            more: true,
            szx: 0,
        }
        .encode(),
    );
    p.add_option(CoapOption::Size1, message::uint_bytes(4096));
    let r = h.exchange(&p).await;
    assert_eq!(code(&r), ResponseType::RequestEntityTooLarge);
    assert_eq!(option_u32(&r, message::SIZE1), Some(1024));
    assert_eq!(fake.stored().len(), 1);
}

#[tokio::test]
async fn malformed_datagrams_get_a_reset_or_silence_and_the_loop_keeps_serving() {
    let fake = Fake::new();
    let h = start(fake.clone(), settings()).await;
    // CON with token length 9: reset with its message id.
    h.send(&[0x49, 0x02, 0xBE, 0xEF, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .await;
    assert_eq!(h.recv_bytes().await.unwrap(), vec![0x70, 0, 0xBE, 0xEF]);
    // Garbage, a truncated header, a wrong version: silence.
    h.send(b"\xde\xad\xbe\xef garbage").await;
    h.send(&[0x40, 0x02]).await;
    h.send(&[0x80, 0x02, 0, 1]).await;
    h.send(&[]).await;
    assert_eq!(h.recv_within(Duration::from_millis(200)).await, None);
    // A ping gets a reset, and is not malformed.
    h.send(&[0x40, 0x00, 0x12, 0x34]).await;
    assert_eq!(h.recv_bytes().await.unwrap(), vec![0x70, 0, 0x12, 0x34]);
    // Unrecognized critical option: 4.02 for CON, silence for NON.
    let mut p = post(5, "t/a", "dev1", Some(50), b"{}");
    p.add_option(CoapOption::IfMatch, vec![1]);
    assert_eq!(code(&h.exchange(&p).await), ResponseType::BadOption);
    p.header.set_type(MessageType::NonConfirmable);
    p.header.message_id = 6;
    h.send(&p.to_bytes().unwrap()).await;
    assert_eq!(h.recv_within(Duration::from_millis(200)).await, None);
    assert!(fake.stored().is_empty());
    // Still serving.
    assert_eq!(
        code(&h.exchange(&post(7, "t/a", "dev1", Some(50), b"{}")).await),
        ResponseType::Created
    );
    // Version 2, truncated, 0xde (version 3), empty, TKL 9.
    assert_eq!(h.metrics.malformed.get(), 5);
    assert_eq!(h.metrics.resets.get(), 2);
}

#[tokio::test]
async fn in_flight_limit_answers_5_03_instead_of_queueing() {
    let (fake, gate) = Fake::held();
    let mut s = settings();
    s.max_in_flight = 1;
    let h = start(fake.clone(), s).await;
    h.send(&post(1, "t/a", "dev1", Some(50), b"{}").to_bytes().unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = h.exchange(&post(2, "t/a", "dev1", Some(50), b"{}")).await;
    assert_eq!(code(&r), ResponseType::ServiceUnavailable);
    assert_eq!(option_u32(&r, message::MAX_AGE), Some(1));
    assert_eq!(h.metrics.overloaded.get(), 1);
    gate.add_permits(1);
    let r = h.recv().await;
    assert_eq!((r.header.message_id, code(&r)), (1, ResponseType::Created));
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight() {
    let (fake, gate) = Fake::held();
    let h = start(fake.clone(), settings()).await;
    h.send(&post(1, "t/a", "dev1", Some(50), b"{}").to_bytes().unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!h.task.is_finished(), "waits for the request in flight");
    gate.add_permits(1);
    let r = h.recv().await;
    assert_eq!(code(&r), ResponseType::Created);
    tokio::time::timeout(Duration::from_secs(5), h.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fake.stored().len(), 1);
}

/// The ingress byte budget: a request whose payload's bytes are held by others is answered
/// 5.03 with Max-Age 1 at once (UDP cannot push back), and taken again once they are freed;
/// the request's own bytes are held until it is answered.
#[tokio::test]
async fn a_spent_ingress_budget_answers_5_03() {
    let budget = crate::ingress::budget::IngressBudget::new(1024);
    let mut s = settings();
    s.budget = Some(budget.clone());
    let (fake, gate) = Fake::held();
    let h = start(fake.clone(), s).await;
    let held = budget
        .try_take(1000)
        .expect("the test holds most of the budget");
    let body = format!("{{\"v\":\"{}\"}}", "x".repeat(92)); // 100 bytes of JSON
    let r = h
        .exchange(&post(1, "t/a", "dev1", Some(50), body.as_bytes()))
        .await;
    assert_eq!(code(&r), ResponseType::ServiceUnavailable);
    assert_eq!(option_u32(&r, message::MAX_AGE), Some(1));
    assert_eq!(h.metrics.overloaded.get(), 1);
    drop(held);
    h.send(
        &post(2, "t/a", "dev1", Some(50), body.as_bytes())
            .to_bytes()
            .unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(budget.used(), 100, "held while the request is in flight");
    gate.add_permits(1);
    let r = h.recv().await;
    assert_eq!((r.header.message_id, code(&r)), (2, ResponseType::Created));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(budget.used(), 0, "released once answered");
    assert_eq!(fake.stored().len(), 1);
}

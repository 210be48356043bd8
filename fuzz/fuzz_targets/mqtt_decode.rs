//! The MQTT server's whole decode path on arbitrary bytes, as a client's socket delivers them in
//! uneven chunks: the CONNECT (any protocol level; MQTT 3.1, 3.1.1 and 5 are read, others
//! refused), then every later packet of that version, then the topic checks a PUBLISH and a
//! SUBSCRIBE go through. No panic; a decode either waits for more bytes, yields packets, or
//! reports why the input is refused — and it never buffers more than one packet's worth.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost_mqtt::codec::{Packet, read_connect, read_packet};
use outpost_mqtt::topic;

/// The server's default `mqtt.max_packet` is 256 KiB; a small limit reaches the size checks.
const MAX_PACKET: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    let mut chunks = data.chunks(5);
    let connect = loop {
        let Some(chunk) = chunks.next() else {
            return;
        };
        buf.extend_from_slice(chunk);
        match read_connect(&mut buf, MAX_PACKET) {
            Err(_) => return,
            Ok(None) => assert!(buf.len() <= MAX_PACKET + 5),
            Ok(Some(c)) => break c,
        }
    };
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match read_packet(&mut buf, connect.version, MAX_PACKET, 16) {
                Err(_) => return,
                Ok(None) => {
                    assert!(buf.len() <= MAX_PACKET + 5);
                    break;
                }
                Ok(Some(Packet::Publish(p))) => {
                    let _ = outpost_config::check_record_topic(&p.topic);
                }
                Ok(Some(Packet::Subscribe(s))) => {
                    for f in &s.filters {
                        if topic::check_filter(&f.filter).is_ok() {
                            let _ = topic::matches(&f.filter, "a/b/c");
                        }
                    }
                }
                Ok(Some(_)) => {}
            }
        }
    }
});

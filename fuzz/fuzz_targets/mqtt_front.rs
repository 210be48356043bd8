//! The MQTT front's decoding path on arbitrary bytes, as a device's socket delivers them: the
//! CONNECT sniffing (`connect_level`), the CONNECT reader for the sniffed protocol level, then the
//! packet decoder of that version (v5 packets translated to their 3.1.1 counterparts). No panic;
//! a decode either waits for more bytes, yields packets, or reports malformed input.
//!
//! The codec module is compiled from the daemon's own source file: the daemon is a binary crate,
//! and `codec.rs` depends only on `bytes`, `rumqttc` and `thiserror` by design.

#![no_main]

#[allow(dead_code, clippy::all)]
#[path = "../../daemon/src/ingress/mqtt/codec.rs"]
mod codec;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The front's default `mqtt.max_packet` is 256 KiB; a small limit reaches the size checks.
const MAX_PACKET: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    let mut chunks = data.chunks(5);
    // CONNECT first, in uneven chunks.
    let (level, connect) = loop {
        let Some(chunk) = chunks.next() else {
            return;
        };
        buf.extend_from_slice(chunk);
        match codec::connect_level(&buf) {
            Err(_) => return,
            Ok(None) => continue,
            Ok(Some(level)) => match codec::read_connect(&mut buf, level, MAX_PACKET) {
                Err(_) => return,
                Ok(None) => continue,
                Ok(Some(connect)) => break (level, connect),
            },
        }
    };
    let _ = connect;
    let version = if level == 5 {
        codec::Version::V5
    } else {
        codec::Version::V4
    };
    let mut device = codec::DeviceCodec::new(version, MAX_PACKET);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match device.read(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= MAX_PACKET + 5 + 5, "buffered more than one packet");
    }
});

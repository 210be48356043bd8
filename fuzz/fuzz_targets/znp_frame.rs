//! Z-Stack MT/UNPI frame decoder and the ZCL attribute decoder on arbitrary bytes: no panic,
//! bounded buffering, and every good frame re-encodes to the bytes it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_drivers::zigbee::frame::{Decoder, MAX_BUFFER, MAX_FRAME};
use outpost_drivers::zigbee::{mt, zcl};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    // Feed in uneven chunks, as a serial port delivers them.
    for chunk in data.chunks(7) {
        decoder.push(chunk);
        assert!(decoder.pending() <= MAX_BUFFER);
        while let Some(result) = decoder.next_frame() {
            if let Ok(frame) = result {
                let bytes = frame.encode().expect("a decoded frame re-encodes");
                assert!(bytes.len() <= MAX_FRAME);
                if let Some(msg) = mt::parse_incoming(&frame.data) {
                    if let Ok(decoded) = zcl::decode(msg.cluster, msg.payload) {
                        for a in &decoded.attributes {
                            let _ = zcl::interpret(a);
                        }
                    }
                }
                let _ = mt::parse_announce(&frame.data);
            }
        }
        assert!(decoder.pending() <= MAX_FRAME + 7);
    }
    // The ZCL decoder on the raw input too (cluster from the first bytes).
    if data.len() >= 2 {
        let cluster = u16::from_le_bytes([data[0], data[1]]);
        if let Ok(decoded) = zcl::decode(cluster, &data[2..]) {
            for a in &decoded.attributes {
                let _ = zcl::interpret(a);
            }
        }
    }
});

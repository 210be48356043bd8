//! The serial line driver's framing and its three line parsers (JSON, CSV, key=value) on
//! arbitrary bytes: no panic, lines never longer than the cap, and every accepted line gives a
//! JSON object payload with a valid device id. The first byte picks the format and the cap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_config::{ByteSize, LineFormat, SerialLineConfig};
use outpost_drivers::line::frame::{Frame, LineFramer};
use outpost_drivers::line::parse::{LineParser, valid_device_id};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let format = match selector % 3 {
        0 => LineFormat::Json,
        1 => LineFormat::Csv,
        _ => LineFormat::Kv,
    };
    let max = 16 + usize::from(selector / 3);
    let config = SerialLineConfig {
        name: "fuzz".into(),
        format,
        device_field: Some("id".into()),
        timestamp_field: Some("ts".into()),
        columns: vec!["id".into(), "ts".into(), "v".into()],
        units: [("v".to_owned(), "Cel".to_owned())].into(),
        max_line_bytes: ByteSize(max as u64),
        ..SerialLineConfig::default()
    };
    let parser = LineParser::new(&config);
    let mut framer = LineFramer::new(max);
    for chunk in data.chunks(5) {
        framer.push(chunk, |frame| {
            if let Frame::Line(line) = frame {
                assert!(line.len() <= max);
                if let Ok(parsed) = parser.parse(line, 0) {
                    assert!(valid_device_id(&parsed.device_id));
                    let value: serde_json::Value =
                        serde_json::from_slice(&parsed.payload).expect("payload is JSON");
                    assert!(value.is_object());
                }
            }
        });
    }
    // The parsers also on the raw input, unframed.
    let _ = parser.parse(data, 0);
});

//! HTTP and CoAP ingestion's body reader (`outpost_codec::body`: JSON and CBOR batches,
//! SenML JSON and CBOR validation, text) on arbitrary bytes in every format. No panic; a body is
//! refused with a reason, or split into at most `max_records` non-empty records that are slices
//! of the body itself (stored unchanged), and a JSON record is a JSON object.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

use outpost_codec::body::{self, BodyError, Format};

const FORMATS: [Format; 6] = [
    Format::Json,
    Format::Cbor,
    Format::SenmlJson,
    Format::SenmlCbor,
    Format::OctetStream,
    Format::Text,
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the batch limit (0-15), so `TooMany` is reached too.
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let max_records = usize::from(first & 0x0f);
    let body = Bytes::copy_from_slice(rest);
    let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    for format in FORMATS {
        match body::split(format, &body, max_records) {
            Err(BodyError::Invalid { field, .. }) => assert!(!field.is_empty()),
            Err(BodyError::TooMany { count, max }) => {
                assert_eq!(max, max_records);
                assert!(count > max);
            }
            Ok(records) => {
                assert!(!records.is_empty() && records.len() <= max_records);
                for record in &records {
                    let start = record.as_ptr() as usize;
                    assert!(!record.is_empty());
                    assert!(range.contains(&start) && start + record.len() <= range.end);
                    if format == Format::Json {
                        let value: serde_json::Value =
                            serde_json::from_slice(record).expect("a JSON record parses");
                        assert!(value.is_object());
                    }
                }
            }
        }
    }
});

//! The DER walker of the MQTT server's TLS code (`outpost_mqtt::tls::certificate_names`), which
//! reads a client certificate's common names and SAN DNS names to find the device, on arbitrary
//! bytes. No panic, no read outside the input: every name it returns is a run of the input's
//! own bytes (DER strings are stored as they are).

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_mqtt::tls::certificate_names;

fuzz_target!(|data: &[u8]| {
    for name in certificate_names(data) {
        let name = name.as_bytes();
        assert!(name.is_empty() || data.windows(name.len()).any(|w| w == name));
    }
});

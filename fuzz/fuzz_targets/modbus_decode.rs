//! The Modbus read planner and response decoder on arbitrary input: points (function, address,
//! type, orders, scale) and response registers/bits come from the fuzzer. No panic, requests
//! within the protocol limits, every point served by exactly one request, and a response of the
//! requested length always decodes every point (a short one is an error, never a panic).

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_config::{DataType, ModbusPointConfig, Order, RegisterKind};
use outpost_drivers::modbus::decode::{Response, decode_request};
use outpost_drivers::modbus::plan::{MAX_BITS, MAX_REGISTERS, plan};
use serde_json::Map;

fuzz_target!(|data: &[u8]| {
    let mut chunks = data.chunks_exact(4);
    let mut points = Vec::new();
    for (i, c) in chunks.by_ref().take(64).enumerate() {
        let function = match c[0] % 4 {
            0 => RegisterKind::Coil,
            1 => RegisterKind::DiscreteInput,
            2 => RegisterKind::Holding,
            _ => RegisterKind::Input,
        };
        let data_type = if function.is_bits() {
            DataType::Bool
        } else {
            [
                DataType::U16,
                DataType::I16,
                DataType::U32,
                DataType::I32,
                DataType::F32,
            ][usize::from(c[1] % 5)]
        };
        let order = |b: bool| if b { Order::Little } else { Order::Big };
        points.push(ModbusPointConfig {
            name: format!("p{i}"),
            function,
            address: u16::from_be_bytes([c[2], c[3]]).min(65_534),
            data_type,
            word_order: order(c[1] & 0x10 != 0),
            byte_order: order(c[1] & 0x20 != 0),
            scale: if c[1] & 0x40 != 0 { 0.1 } else { 1.0 },
            ..ModbusPointConfig::default()
        });
        if c[0] & 0x80 != 0 {
            break;
        }
    }
    let words: Vec<u16> = chunks
        .remainder()
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))
        .collect();
    let groups = plan(&points);
    let mut served = vec![0usize; points.len()];
    for group in &groups {
        for request in &group.requests {
            let limit = if group.function.is_bits() {
                MAX_BITS
            } else {
                MAX_REGISTERS
            };
            assert!(request.count >= 1 && request.count <= limit);
            for &i in &request.points {
                served[i] += 1;
            }
            let full_words: Vec<u16> = (0..request.count)
                .map(|i| words.get(usize::from(i)).copied().unwrap_or(i))
                .collect();
            let full_bits: Vec<bool> = full_words.iter().map(|w| w & 1 == 1).collect();
            let (mut fields, mut units) = (Map::new(), Map::new());
            let response = if group.function.is_bits() {
                Response::Bits(&full_bits)
            } else {
                Response::Registers(&full_words)
            };
            decode_request(request, response, &points, &mut fields, &mut units)
                .expect("a complete response decodes");
            // A short response is an error, not a panic.
            let short = &full_words[..words.len().min(full_words.len())];
            let _ = decode_request(
                request,
                Response::Registers(short),
                &points,
                &mut Map::new(),
                &mut Map::new(),
            );
        }
    }
    assert!(served.iter().all(|&n| n == 1), "{served:?}");
});

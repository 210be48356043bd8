//! Decoding a read response into point values: register words or bits → typed value →
//! `raw * scale + offset` → JSON.
//!
//! Modbus puts each 16-bit register on the wire big-endian; the client library hands us the
//! registers as numbers. `byte_order = "little"` swaps the two bytes of each register (devices
//! that store little-endian data); for two-register types `word_order = "big"` takes the first
//! register as the high word and `"little"` the second. Integers with `scale = 1` and
//! `offset = 0` stay JSON integers; everything else becomes a float. A NaN or infinite `f32`
//! becomes `null`.

use outpost_config::{DataType, ModbusPointConfig, Order};
use serde_json::{Map, Value};

use super::plan::ReadRequest;

/// What a read request returned.
#[derive(Debug, Clone, Copy)]
pub enum Response<'a> {
    Registers(&'a [u16]),
    Bits(&'a [bool]),
}

/// The response does not cover a point (the device sent fewer registers than asked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("response of {got} values is too short for point `{point}` (needs {needed})")]
pub struct ShortResponse {
    pub point: String,
    pub got: usize,
    pub needed: usize,
}

/// Decodes every point served by `request` into `fields` (and their units into `units`).
pub fn decode_request(
    request: &ReadRequest,
    response: Response<'_>,
    points: &[ModbusPointConfig],
    fields: &mut Map<String, Value>,
    units: &mut Map<String, Value>,
) -> Result<(), ShortResponse> {
    for &i in &request.points {
        let Some(point) = points.get(i) else { continue };
        let offset = usize::from(point.address.saturating_sub(request.start));
        let width = usize::from(point.data_type.width());
        let value = match response {
            Response::Bits(bits) => bits.get(offset).map(|&b| Value::Bool(b)),
            Response::Registers(words) => words
                .get(offset..offset + width)
                .map(|w| register_value(w, point)),
        };
        let Some(value) = value else {
            let got = match response {
                Response::Bits(b) => b.len(),
                Response::Registers(w) => w.len(),
            };
            return Err(ShortResponse {
                point: point.name.clone(),
                got,
                needed: offset + width,
            });
        };
        fields.insert(point.name.clone(), value);
        if let Some(unit) = &point.unit {
            units.insert(point.name.clone(), Value::String(unit.clone()));
        }
    }
    Ok(())
}

/// The value of one register point from its `width` registers.
pub fn register_value(words: &[u16], point: &ModbusPointConfig) -> Value {
    let word = |i: usize| {
        let w = words.get(i).copied().unwrap_or(0);
        match point.byte_order {
            Order::Big => w,
            Order::Little => w.swap_bytes(),
        }
    };
    let dword = || {
        let (hi, lo) = match point.word_order {
            Order::Big => (word(0), word(1)),
            Order::Little => (word(1), word(0)),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    };
    let raw = match point.data_type {
        DataType::Bool => return Value::Bool(word(0) != 0),
        DataType::U16 => Raw::Int(i64::from(word(0))),
        DataType::I16 => Raw::Int(i64::from(word(0) as i16)),
        DataType::U32 => Raw::Int(i64::from(dword())),
        DataType::I32 => Raw::Int(i64::from(dword() as i32)),
        DataType::F32 => Raw::Float(f64::from(f32::from_bits(dword()))),
    };
    let identity = point.scale == 1.0 && point.offset == 0.0;
    match raw {
        Raw::Int(i) if identity => Value::from(i),
        Raw::Int(i) => float(i as f64 * point.scale + point.offset),
        Raw::Float(f) if identity => float(f),
        Raw::Float(f) => float(f * point.scale + point.offset),
    }
}

enum Raw {
    Int(i64),
    Float(f64),
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(data_type: DataType, word_order: Order, byte_order: Order) -> ModbusPointConfig {
        ModbusPointConfig {
            name: "v".into(),
            data_type,
            word_order,
            byte_order,
            ..ModbusPointConfig::default()
        }
    }

    #[test]
    fn types_and_orders() {
        use DataType::*;
        use Order::*;
        assert_eq!(
            register_value(&[0xfffe], &p(U16, Big, Big)),
            Value::from(65534)
        );
        assert_eq!(
            register_value(&[0xfffe], &p(I16, Big, Big)),
            Value::from(-2)
        );
        assert_eq!(
            register_value(&[0x0100], &p(U16, Big, Little)),
            Value::from(1)
        );
        assert_eq!(
            register_value(&[0x0001, 0x0002], &p(U32, Big, Big)),
            Value::from(0x0001_0002)
        );
        assert_eq!(
            register_value(&[0x0002, 0x0001], &p(U32, Little, Big)),
            Value::from(0x0001_0002)
        );
        assert_eq!(
            register_value(&[0xffff, 0xfffe], &p(I32, Big, Big)),
            Value::from(-2)
        );
        // 123.456f32 = 0x42F6E979.
        assert_eq!(
            register_value(&[0x42f6, 0xe979], &p(F32, Big, Big)),
            Value::from(f64::from(123.456_f32))
        );
        assert_eq!(
            register_value(&[0xe979, 0x42f6], &p(F32, Little, Big)),
            Value::from(f64::from(123.456_f32))
        );
        assert_eq!(
            register_value(&[0xf642, 0x79e9], &p(F32, Big, Little)),
            Value::from(f64::from(123.456_f32))
        );
        assert_eq!(register_value(&[0x7fc0, 0], &p(F32, Big, Big)), Value::Null);
    }

    #[test]
    fn scale_and_offset() {
        let mut point = p(DataType::I16, Order::Big, Order::Big);
        point.scale = 0.1;
        point.offset = -40.0;
        let Value::Number(n) = register_value(&[655], &point) else {
            panic!("a number");
        };
        assert!((n.as_f64().expect("f64") - 25.5).abs() < 1e-9);
    }

    #[test]
    fn request_decoding_and_short_responses() {
        let points = vec![
            ModbusPointConfig {
                name: "a".into(),
                address: 10,
                unit: Some("V".into()),
                ..ModbusPointConfig::default()
            },
            ModbusPointConfig {
                name: "b".into(),
                address: 12,
                data_type: DataType::U32,
                ..ModbusPointConfig::default()
            },
        ];
        let request = ReadRequest {
            start: 10,
            count: 4,
            points: vec![0, 1],
        };
        let (mut fields, mut units) = (Map::new(), Map::new());
        decode_request(
            &request,
            Response::Registers(&[230, 0, 0, 7]),
            &points,
            &mut fields,
            &mut units,
        )
        .expect("complete");
        assert_eq!(Value::Object(fields), serde_json::json!({"a": 230, "b": 7}));
        assert_eq!(Value::Object(units), serde_json::json!({"a": "V"}));
        let err = decode_request(
            &request,
            Response::Registers(&[230, 0, 0]),
            &points,
            &mut Map::new(),
            &mut Map::new(),
        )
        .expect_err("short");
        assert_eq!(err.point, "b");
    }
}

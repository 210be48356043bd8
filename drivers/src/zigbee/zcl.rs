//! ZCL (Zigbee Cluster Library) attribute decoding: the payload of `AF_INCOMING_MSG`.
//!
//! Only the two global commands that carry attribute values are decoded: Report Attributes
//! (0x0a) and Read Attributes Response (0x01). Known cluster attributes become named values with
//! units ([`Value`]); everything else is kept raw (cluster, attribute and type ids plus the hex
//! of the attribute data), never dropped. A malformed payload is an error for the caller to
//! count; attributes decoded before the malformed part are kept.
//!
//! A frame with the manufacturer-specific bit (frame control bit 2) carries a manufacturer
//! code, and under ZCL its attribute ids belong to that manufacturer, not to the cluster's
//! standard attribute set: attribute 0x0000 of a manufacturer-specific frame on the temperature
//! cluster is *not* MeasuredValue. Such attributes keep their [`Attribute::manufacturer`] and
//! are never interpreted as standard values.

use std::fmt::Write as _;

/// Frame control bit: the frame carries a manufacturer code after the frame control.
const FC_MANUFACTURER_SPECIFIC: u8 = 0x04;

/// ZCL global command: Read Attributes Response.
pub const CMD_READ_ATTRIBUTES_RSP: u8 = 0x01;
/// ZCL global command: Report Attributes.
pub const CMD_REPORT_ATTRIBUTES: u8 = 0x0a;

pub mod cluster {
    pub const POWER_CONFIGURATION: u16 = 0x0001;
    pub const ON_OFF: u16 = 0x0006;
    pub const ILLUMINANCE: u16 = 0x0400;
    pub const TEMPERATURE: u16 = 0x0402;
    pub const PRESSURE: u16 = 0x0403;
    pub const HUMIDITY: u16 = 0x0405;
    pub const OCCUPANCY: u16 = 0x0406;
}

/// A decoded ZCL attribute value by data type.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bool(bool),
    /// bitmap8..64, enum8/16, data8..64, uint8..64
    Unsigned(u64),
    /// int8..64
    Signed(i64),
    Float(f64),
    String(String),
    /// Types without a numeric or text meaning (octet strings, IEEE addresses, ...).
    Bytes(Vec<u8>),
}

/// One attribute as found in the frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub cluster: u16,
    /// The manufacturer code of a manufacturer-specific frame; its attribute ids are that
    /// manufacturer's, so [`interpret`] leaves the attribute raw.
    pub manufacturer: Option<u16>,
    pub id: u16,
    pub data_type: u8,
    /// The attribute's value bytes as on the air.
    pub raw: Vec<u8>,
    pub data: Data,
}

/// A named measurement derived from a known attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: &'static str,
    pub value: ValueKind,
    pub unit: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    Number(f64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZclError {
    /// The frame ends inside a header or a value: count it as malformed.
    #[error("ZCL payload truncated at byte {at}")]
    Truncated { at: usize },
    /// A data type whose length we do not know: the rest of the frame cannot be parsed.
    #[error("unsupported ZCL data type {data_type:#04x}")]
    UnknownType { data_type: u8 },
    /// Not Report Attributes nor Read Attributes Response (cluster-specific or another
    /// command): ignore.
    #[error(
        "ZCL command {command:#04x} (frame control {frame_control:#04x}) carries no attributes"
    )]
    NotAttributes { frame_control: u8, command: u8 },
}

/// The result of decoding one ZCL frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoded {
    pub attributes: Vec<Attribute>,
    /// Set when the frame was cut short; `attributes` holds what came before.
    pub error: Option<ZclError>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ZclError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(ZclError::Truncated { at: self.at })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ZclError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ZclError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// Decodes the ZCL frame `payload` received on `cluster`.
pub fn decode(cluster: u16, payload: &[u8]) -> Result<Decoded, ZclError> {
    let mut c = Cursor {
        bytes: payload,
        at: 0,
    };
    let frame_control = c.u8()?;
    let manufacturer = if frame_control & FC_MANUFACTURER_SPECIFIC != 0 {
        Some(c.u16()?)
    } else {
        None
    };
    let _seq = c.u8()?;
    let command = c.u8()?;
    let global = frame_control & 0x03 == 0;
    if !global || !matches!(command, CMD_REPORT_ATTRIBUTES | CMD_READ_ATTRIBUTES_RSP) {
        return Err(ZclError::NotAttributes {
            frame_control,
            command,
        });
    }
    let mut out = Decoded::default();
    while !c.done() {
        match attribute(&mut c, cluster, manufacturer, command) {
            Ok(Some(a)) => out.attributes.push(a),
            Ok(None) => {}
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    Ok(out)
}

fn attribute(
    c: &mut Cursor<'_>,
    cluster: u16,
    manufacturer: Option<u16>,
    command: u8,
) -> Result<Option<Attribute>, ZclError> {
    let id = c.u16()?;
    if command == CMD_READ_ATTRIBUTES_RSP && c.u8()? != 0 {
        return Ok(None); // status != SUCCESS: no type, no value
    }
    let data_type = c.u8()?;
    let (raw, data) = value(c, data_type)?;
    Ok(Some(Attribute {
        cluster,
        manufacturer,
        id,
        data_type,
        raw: raw.to_vec(),
        data,
    }))
}

fn le_unsigned(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x))
}

fn le_signed(b: &[u8]) -> i64 {
    let bits = 8 * b.len() as u32;
    let u = le_unsigned(b);
    let shift = 64 - bits;
    ((u << shift) as i64) >> shift
}

/// Parses one value of `data_type`, with length checks.
fn value<'a>(c: &mut Cursor<'a>, data_type: u8) -> Result<(&'a [u8], Data), ZclError> {
    Ok(match data_type {
        0x10 => {
            let b = c.take(1)?;
            (b, Data::Bool(b[0] == 1))
        }
        // data8..64, bitmap8..64, uint8..64, enum8/16
        0x08..=0x0f | 0x18..=0x1f | 0x20..=0x27 | 0x30 | 0x31 => {
            let n = match data_type {
                0x30 => 1,
                0x31 => 2,
                t => usize::from(t & 0x07) + 1,
            };
            let b = c.take(n)?;
            (b, Data::Unsigned(le_unsigned(b)))
        }
        0x28..=0x2f => {
            let b = c.take(usize::from(data_type & 0x07) + 1)?;
            (b, Data::Signed(le_signed(b)))
        }
        0x38 => {
            let b = c.take(2)?;
            (b, Data::Float(half(u16::from_le_bytes([b[0], b[1]]))))
        }
        0x39 => {
            let b = c.take(4)?;
            let f = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (b, Data::Float(f64::from(f)))
        }
        0x3a => {
            let b = c.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (b, Data::Float(f64::from_le_bytes(a)))
        }
        0x41 | 0x42 => {
            let start = c.at;
            let n = c.u8()?;
            // 0xff is the "invalid" string: no content follows.
            let body = if n == 0xff {
                &[][..]
            } else {
                c.take(usize::from(n))?
            };
            let raw = &c.bytes[start..c.at];
            let data = if data_type == 0x42 {
                Data::String(String::from_utf8_lossy(body).into_owned())
            } else {
                Data::Bytes(body.to_vec())
            };
            (raw, data)
        }
        0x43 | 0x44 => {
            let start = c.at;
            let n = c.u16()?;
            let body = if n == 0xffff {
                &[][..]
            } else {
                c.take(usize::from(n))?
            };
            let raw = &c.bytes[start..c.at];
            let data = if data_type == 0x44 {
                Data::String(String::from_utf8_lossy(body).into_owned())
            } else {
                Data::Bytes(body.to_vec())
            };
            (raw, data)
        }
        // time of day, date, UTC time, cluster id, attribute id, BACnet OID, IEEE address, key
        0xe0..=0xe2 | 0xea => {
            let b = c.take(4)?;
            (b, Data::Bytes(b.to_vec()))
        }
        0xe8 | 0xe9 => {
            let b = c.take(2)?;
            (b, Data::Unsigned(le_unsigned(b)))
        }
        0xf0 => {
            let b = c.take(8)?;
            (b, Data::Bytes(b.to_vec()))
        }
        0xf1 => {
            let b = c.take(16)?;
            (b, Data::Bytes(b.to_vec()))
        }
        other => return Err(ZclError::UnknownType { data_type: other }),
    })
}

/// IEEE 754 half precision ("semi-precision" in ZCL).
fn half(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Rounds to `digits` decimals so that `2150 * 0.01` prints as `21.5`.
fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// The named value a known attribute stands for; `None` for unknown attributes, for a known
/// attribute of an unexpected type, for the ZCL "invalid" marker values, and for every attribute
/// of a manufacturer-specific frame (its ids are the manufacturer's, not the standard ones).
pub fn interpret(a: &Attribute) -> Option<Value> {
    if a.manufacturer.is_some() {
        return None;
    }
    let num = |name, v: f64, unit| {
        Some(Value {
            name,
            value: ValueKind::Number(v),
            unit: Some(unit),
        })
    };
    match (a.cluster, a.id, &a.data) {
        (cluster::TEMPERATURE, 0x0000, Data::Signed(v)) if *v != -0x8000 => {
            num("temperature", round(*v as f64 * 0.01, 2), "°C")
        }
        (cluster::HUMIDITY, 0x0000, Data::Unsigned(v)) if *v != 0xffff => {
            num("humidity", round(*v as f64 * 0.01, 2), "%")
        }
        // MeasuredValue is kPa × 10, i.e. hPa.
        (cluster::PRESSURE, 0x0000, Data::Signed(v)) if *v != -0x8000 => {
            num("pressure", *v as f64, "hPa")
        }
        (cluster::ILLUMINANCE, 0x0000, Data::Unsigned(v)) if *v != 0xffff => {
            let lux = if *v == 0 {
                0.0
            } else {
                10f64.powf((*v as f64 - 1.0) / 10000.0)
            };
            num("illuminance", round(lux, 2), "lx")
        }
        (cluster::OCCUPANCY, 0x0000, Data::Unsigned(v)) => Some(Value {
            name: "occupancy",
            value: ValueKind::Bool(v & 1 == 1),
            unit: None,
        }),
        (cluster::ON_OFF, 0x0000, Data::Bool(b)) => Some(Value {
            name: "on",
            value: ValueKind::Bool(*b),
            unit: None,
        }),
        (cluster::POWER_CONFIGURATION, 0x0020, Data::Unsigned(v)) if *v != 0xff => {
            num("battery_voltage", round(*v as f64 * 0.1, 1), "V")
        }
        (cluster::POWER_CONFIGURATION, 0x0021, Data::Unsigned(v)) if *v != 0xff => {
            num("battery", *v as f64 / 2.0, "%")
        }
        _ => None,
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(cluster: u16, payload: &[u8]) -> Value {
        let d = decode(cluster, payload).unwrap();
        assert_eq!(d.error, None);
        assert_eq!(d.attributes.len(), 1);
        interpret(&d.attributes[0]).unwrap()
    }

    #[test]
    fn known_clusters() {
        // frame control 0x18 (global, server→client, disable default rsp), seq, 0x0a
        let t = one(0x0402, &[0x18, 1, 0x0a, 0x00, 0x00, 0x29, 0x66, 0x08]);
        assert_eq!(t.value, ValueKind::Number(21.5));
        assert_eq!(t.unit, Some("°C"));
        let t = one(0x0402, &[0x18, 1, 0x0a, 0x00, 0x00, 0x29, 0x0c, 0xfe]);
        assert_eq!(t.value, ValueKind::Number(-5.0));
        let h = one(0x0405, &[0x18, 1, 0x0a, 0x00, 0x00, 0x21, 0x1e, 0x19]);
        assert_eq!(h.value, ValueKind::Number(64.3));
        let p = one(0x0403, &[0x08, 1, 0x0a, 0x00, 0x00, 0x29, 0xf5, 0x03]);
        assert_eq!((p.value, p.unit), (ValueKind::Number(1013.0), Some("hPa")));
        let l = one(0x0400, &[0x18, 1, 0x0a, 0x00, 0x00, 0x21, 0x31, 0x75]);
        assert_eq!(l.value, ValueKind::Number(1000.0)); // 30001 → 10^3
        let o = one(0x0406, &[0x18, 1, 0x0a, 0x00, 0x00, 0x18, 0x01]);
        assert_eq!(o.value, ValueKind::Bool(true));
        let s = one(0x0006, &[0x18, 1, 0x0a, 0x00, 0x00, 0x10, 0x00]);
        assert_eq!(s.value, ValueKind::Bool(false));
        let v = one(0x0001, &[0x18, 1, 0x0a, 0x20, 0x00, 0x20, 0x1e]);
        assert_eq!(v.value, ValueKind::Number(3.0));
        let b = one(0x0001, &[0x18, 1, 0x0a, 0x21, 0x00, 0x20, 0xc8]);
        assert_eq!((b.value, b.unit), (ValueKind::Number(100.0), Some("%")));
    }

    #[test]
    fn read_attributes_response_skips_failed_status() {
        let d = decode(
            0x0402,
            &[
                0x08, 2, 0x01, 0x01, 0x00, 0x86, 0x00, 0x00, 0x00, 0x29, 0x34, 0x08,
            ],
        )
        .unwrap();
        assert_eq!(d.attributes.len(), 1);
        assert_eq!(
            interpret(&d.attributes[0]).unwrap().value,
            ValueKind::Number(21.0)
        );
    }

    #[test]
    fn manufacturer_specific_and_many_types() {
        let payload = [
            0x1c, 0x5f, 0x11, 3, 0x0a, // mfr 0x115f
            0x01, 0xff, 0x42, 0x03, b'a', b'b', b'c', // string
            0x02, 0xff, 0x2b, 0xff, 0xff, 0xff, 0xff, // int32 -1
            0x03, 0xff, 0x39, 0x00, 0x00, 0xc0, 0x3f, // float 1.5
            0x04, 0xff, 0x22, 0x01, 0x02, 0x03, // uint24
            0x05, 0xff, 0x23, 0x01, 0x00, 0x00, 0x80, // uint32
            0x06, 0xff, 0x28, 0x80, // int8 -128
            0x07, 0xff, 0x30, 0x02, // enum8
        ];
        let d = decode(0xfc00, &payload).unwrap();
        assert_eq!(d.error, None);
        let data: Vec<_> = d.attributes.iter().map(|a| a.data.clone()).collect();
        assert_eq!(
            data,
            [
                Data::String("abc".into()),
                Data::Signed(-1),
                Data::Float(1.5),
                Data::Unsigned(0x030201),
                Data::Unsigned(0x8000_0001),
                Data::Signed(-128),
                Data::Unsigned(2),
            ]
        );
        assert!(d.attributes.iter().all(|a| interpret(a).is_none()));
        assert_eq!(hex(&d.attributes[0].raw), "03616263");
    }

    #[test]
    fn malformed_keeps_what_came_before() {
        let d = decode(
            0x0402,
            &[
                0x18, 1, 0x0a, 0x00, 0x00, 0x29, 0x66, 0x08, 0x01, 0x00, 0x29, 0x01,
            ],
        )
        .unwrap();
        assert_eq!(d.attributes.len(), 1);
        assert!(matches!(d.error, Some(ZclError::Truncated { .. })));
        let d = decode(0x0402, &[0x18, 1, 0x0a, 0x00, 0x00, 0x4c, 0x00]).unwrap();
        assert_eq!(d.error, Some(ZclError::UnknownType { data_type: 0x4c }));
        let d = decode(0x0402, &[0x18, 1, 0x0a, 0x00, 0x00, 0x42, 0x05, b'a']).unwrap();
        assert!(d.error.is_some());
        assert!(decode(0x0402, &[0x18]).is_err());
        assert!(matches!(
            decode(0x0006, &[0x01, 1, 0x01]),
            Err(ZclError::NotAttributes { .. })
        ));
    }

    #[test]
    fn manufacturer_specific_attributes_are_never_standard_ones() {
        // The temperature cluster's MeasuredValue id and type, but in a manufacturer-specific
        // frame (code 0x115f): the manufacturer's attribute 0x0000, not 21.0 °C.
        let d = decode(
            0x0402,
            &[0x1c, 0x5f, 0x11, 7, 0x0a, 0x00, 0x00, 0x29, 0x34, 0x08],
        )
        .unwrap();
        assert_eq!(d.error, None);
        let a = &d.attributes[0];
        assert_eq!((a.manufacturer, a.id), (Some(0x115f), 0x0000));
        assert_eq!(a.data, Data::Signed(0x0834));
        assert_eq!(interpret(a), None);
        // The same attribute without the bit is the standard one.
        let d = decode(0x0402, &[0x18, 7, 0x0a, 0x00, 0x00, 0x29, 0x34, 0x08]).unwrap();
        assert_eq!(d.attributes[0].manufacturer, None);
        assert_eq!(
            interpret(&d.attributes[0]).unwrap().value,
            ValueKind::Number(21.0)
        );
    }

    #[test]
    fn invalid_markers_are_not_values() {
        let d = decode(0x0402, &[0x18, 1, 0x0a, 0x00, 0x00, 0x29, 0x00, 0x80]).unwrap();
        assert!(interpret(&d.attributes[0]).is_none());
    }
}

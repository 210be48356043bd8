//! Read planning: a slave's points → poll groups → as few read requests as the layout allows.
//!
//! Points of one slave with the same function (table) and interval form a group, polled together
//! and stored as one reading. Within a group, points sorted by address are merged greedily into
//! requests while the request stays within the protocol limit (125 registers, 2000 bits) and the
//! hole between two points is small (at most 8 registers, or 128 bits): reading a few unused
//! registers is cheaper than another round trip. Overlapping points share registers.
//!
//! A device that answers "illegal data address" for registers inside such a hole needs its
//! points split into separate intervals or spaced apart; the exception is counted per slave.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_config::{ModbusPointConfig, RegisterKind};

/// Most registers one read request may ask for (function 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// Most bits one read request may ask for (function 1 and 2).
pub const MAX_BITS: u16 = 2000;
/// Largest hole between two points that is read through rather than split, in registers.
pub const MAX_GAP_REGISTERS: u16 = 8;
/// The same for bits.
pub const MAX_GAP_BITS: u16 = 128;

/// Points polled together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub function: RegisterKind,
    pub interval: Duration,
    pub requests: Vec<ReadRequest>,
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// First register or bit.
    pub start: u16,
    /// Number of registers or bits.
    pub count: u16,
    /// Indices into the slave's points.
    pub points: Vec<usize>,
}

/// Plans the groups of one slave; groups come out ordered by (function, interval).
pub fn plan(points: &[ModbusPointConfig]) -> Vec<Group> {
    let mut by_group: BTreeMap<(RegisterKind, Duration), Vec<usize>> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        by_group
            .entry((p.function, p.interval))
            .or_default()
            .push(i);
    }
    by_group
        .into_iter()
        .map(|((function, interval), mut members)| {
            members.sort_by_key(|&i| (points[i].address, i));
            let (max, gap) = if function.is_bits() {
                (MAX_BITS, MAX_GAP_BITS)
            } else {
                (MAX_REGISTERS, MAX_GAP_REGISTERS)
            };
            let mut requests: Vec<ReadRequest> = Vec::new();
            for i in members {
                let start = u32::from(points[i].address);
                let end = start + u32::from(points[i].data_type.width());
                if let Some(last) = requests.last_mut() {
                    let last_end = u32::from(last.start) + u32::from(last.count);
                    let merged_end = end.max(last_end);
                    let fits = merged_end - u32::from(last.start) <= u32::from(max);
                    let close = start <= last_end + u32::from(gap);
                    if fits && close {
                        last.count =
                            u16::try_from(merged_end - u32::from(last.start)).unwrap_or(max);
                        last.points.push(i);
                        continue;
                    }
                }
                requests.push(ReadRequest {
                    start: points[i].address,
                    count: u16::try_from(end - start).unwrap_or(1),
                    points: vec![i],
                });
            }
            Group {
                function,
                interval,
                requests,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_config::DataType;

    fn point(function: RegisterKind, address: u16, data_type: DataType) -> ModbusPointConfig {
        ModbusPointConfig {
            name: format!("p{address}"),
            function,
            address,
            data_type,
            ..ModbusPointConfig::default()
        }
    }

    type Shape = Vec<(RegisterKind, Vec<(u16, u16, Vec<usize>)>)>;

    fn shape(groups: &[Group]) -> Shape {
        groups
            .iter()
            .map(|g| {
                let requests = g
                    .requests
                    .iter()
                    .map(|r| (r.start, r.count, r.points.clone()))
                    .collect();
                (g.function, requests)
            })
            .collect()
    }

    #[test]
    fn contiguous_and_small_gaps_merge_big_gaps_split() {
        use DataType::*;
        use RegisterKind::*;
        let points = [
            point(Holding, 10, U32), // 10-11
            point(Holding, 0, U16),  // 0
            point(Holding, 1, F32),  // 1-2
            point(Holding, 40, I16), // gap of 28 from 12: new request
            point(Holding, 11, U16), // overlaps the u32
            point(Input, 5, U16),    // other function: other group
            point(Coil, 3, Bool),    // bits
            point(Coil, 100, Bool),  // gap 96 bits <= 128: merged
            point(Coil, 1000, Bool), // gap too big
        ];
        let groups = plan(&points);
        assert_eq!(
            shape(&groups),
            [
                (Coil, vec![(3, 98, vec![6, 7]), (1000, 1, vec![8])]),
                (Holding, vec![(0, 12, vec![1, 2, 0, 4]), (40, 1, vec![3])]),
                (Input, vec![(5, 1, vec![5])]),
            ]
        );
    }

    #[test]
    fn requests_respect_the_protocol_limit() {
        // 130 consecutive u16 registers: 125 + 5.
        let points: Vec<_> = (0..130)
            .map(|a| point(RegisterKind::Input, a, DataType::U16))
            .collect();
        let groups = plan(&points);
        let counts: Vec<_> = groups[0]
            .requests
            .iter()
            .map(|r| (r.start, r.count))
            .collect();
        assert_eq!(counts, [(0, 125), (125, 5)]);
        // A two-register value never straddles the limit.
        let mut points: Vec<_> = (0..124)
            .map(|a| point(RegisterKind::Input, a, DataType::U16))
            .collect();
        points.push(point(RegisterKind::Input, 124, DataType::F32));
        let groups = plan(&points);
        let counts: Vec<_> = groups[0]
            .requests
            .iter()
            .map(|r| (r.start, r.count))
            .collect();
        assert_eq!(counts, [(0, 124), (124, 2)]);
    }

    #[test]
    fn intervals_form_separate_groups() {
        let mut fast = point(RegisterKind::Holding, 0, DataType::U16);
        fast.interval = Duration::from_millis(100);
        let slow = point(RegisterKind::Holding, 1, DataType::U16);
        let groups = plan(&[fast, slow]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].interval, Duration::from_millis(100));
    }
}

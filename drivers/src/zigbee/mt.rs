//! The MT commands the driver uses: builders for requests and parsers for the indications and
//! responses it reads. Byte layouts follow TI's "Z-Stack Monitor and Test API" document; all
//! multi-byte fields are little-endian.

use super::frame::{CmdType, Frame, subsystem};

pub const SYS_RESET_REQ: u8 = 0x00;
pub const SYS_PING: u8 = 0x01;
pub const SYS_VERSION: u8 = 0x02;
pub const SYS_OSAL_NV_READ: u8 = 0x08;
pub const SYS_OSAL_NV_WRITE: u8 = 0x09;
pub const SYS_RESET_IND: u8 = 0x80;
pub const AF_REGISTER: u8 = 0x00;
pub const AF_INCOMING_MSG: u8 = 0x81;
pub const ZDO_MGMT_PERMIT_JOIN_REQ: u8 = 0x36;
pub const ZDO_STARTUP_FROM_APP: u8 = 0x40;
pub const ZDO_EXT_NWK_INFO: u8 = 0x50;
pub const ZDO_STATE_CHANGE_IND: u8 = 0xC0;
pub const ZDO_END_DEVICE_ANNCE_IND: u8 = 0xC1;
pub const UTIL_GET_DEVICE_INFO: u8 = 0x00;
pub const UTIL_ADDRMGR_NWK_ADDR_LOOKUP: u8 = 0x41;
pub const APP_CNF_BDB_START_COMMISSIONING: u8 = 0x05;
pub const APP_CNF_BDB_SET_CHANNEL: u8 = 0x08;

/// NV item ids (`ZCD_NV_*`).
pub const ZCD_NV_PANID: u16 = 0x0083;
pub const ZCD_NV_LOGICAL_TYPE: u16 = 0x0087;
/// BDB: 1 when the node is on a network (set by formation, kept across resets).
pub const ZCD_NV_BDBNODEISONANETWORK: u16 = 0x004F;
/// `devStates_t` value of a running coordinator.
pub const DEV_ZB_COORD: u8 = 9;
/// BDB commissioning mode bit: network formation.
pub const BDB_NETWORK_FORMATION: u8 = 0x04;
/// AF_REGISTER status for an endpoint that is already registered (`ZApsDuplicateEntry`).
pub const STATUS_DUPLICATE: u8 = 0xB8;
/// The endpoint and profile the driver registers.
pub const ENDPOINT: u8 = 1;
pub const PROFILE_HA: u16 = 0x0104;

pub fn sys_reset_soft() -> Frame {
    Frame::new(CmdType::Areq, subsystem::SYS, SYS_RESET_REQ, vec![0x01])
}

pub fn sreq(sub: u8, id: u8, data: Vec<u8>) -> Frame {
    Frame::new(CmdType::Sreq, sub, id, data)
}

/// `SYS_OSAL_NV_READ`: Id(2) Offset.
pub fn nv_read(id: u16) -> Frame {
    let mut data = id.to_le_bytes().to_vec();
    data.push(0);
    sreq(subsystem::SYS, SYS_OSAL_NV_READ, data)
}

/// `SYS_OSAL_NV_WRITE`: Id(2) Offset Len Value[Len].
pub fn nv_write(id: u16, value: &[u8]) -> Frame {
    let mut data = id.to_le_bytes().to_vec();
    data.push(0); // offset
    data.push(value.len() as u8);
    data.extend_from_slice(value);
    sreq(subsystem::SYS, SYS_OSAL_NV_WRITE, data)
}

pub fn bdb_set_channel(primary: bool, mask: u32) -> Frame {
    let mut data = vec![u8::from(primary)];
    data.extend_from_slice(&mask.to_le_bytes());
    sreq(subsystem::APP_CNF, APP_CNF_BDB_SET_CHANNEL, data)
}

pub fn af_register(in_clusters: &[u16], out_clusters: &[u16]) -> Frame {
    let mut data = vec![ENDPOINT];
    data.extend_from_slice(&PROFILE_HA.to_le_bytes());
    data.extend_from_slice(&0x0005u16.to_le_bytes()); // device id: configuration tool
    data.push(0); // device version
    data.push(0); // latency: no latency
    for list in [in_clusters, out_clusters] {
        data.push(list.len() as u8);
        for c in list {
            data.extend_from_slice(&c.to_le_bytes());
        }
    }
    sreq(subsystem::AF, AF_REGISTER, data)
}

/// Permit join on all routers and the coordinator (broadcast 0xFFFC), `seconds` ≤ 254.
pub fn permit_join(seconds: u8) -> Frame {
    let mut data = vec![0x0F]; // AddrMode: broadcast
    data.extend_from_slice(&0xFFFCu16.to_le_bytes());
    data.push(seconds);
    data.push(0); // TCSignificance
    sreq(subsystem::ZDO, ZDO_MGMT_PERMIT_JOIN_REQ, data)
}

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*d.get(at)?, *d.get(at + 1)?]))
}

fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    let b = d.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// `ZDO_END_DEVICE_ANNCE_IND`: SrcAddr(2) NwkAddr(2) IEEEAddr(8) Capabilities(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub nwk: u16,
    pub ieee: u64,
    pub capabilities: u8,
}

pub fn parse_announce(d: &[u8]) -> Option<Announce> {
    Some(Announce {
        nwk: u16_at(d, 2)?,
        ieee: u64_at(d, 4)?,
        capabilities: *d.get(12)?,
    })
}

/// `AF_INCOMING_MSG`: GroupId(2) ClusterId(2) SrcAddr(2) SrcEndpoint DstEndpoint WasBroadcast
/// LinkQuality SecurityUse TimeStamp(4) TransSeqNumber Len Data[Len] ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming<'a> {
    pub cluster: u16,
    pub src: u16,
    pub src_endpoint: u8,
    pub link_quality: u8,
    pub payload: &'a [u8],
}

pub fn parse_incoming(d: &[u8]) -> Option<Incoming<'_>> {
    let len = usize::from(*d.get(16)?);
    Some(Incoming {
        cluster: u16_at(d, 2)?,
        src: u16_at(d, 4)?,
        src_endpoint: *d.get(6)?,
        link_quality: *d.get(9)?,
        payload: d.get(17..17 + len)?,
    })
}

/// `UTIL_GET_DEVICE_INFO` response: Status IEEEAddr(8) ShortAddr(2) DeviceType DeviceState ...
pub fn parse_device_info(d: &[u8]) -> Option<(u64, u8)> {
    Some((u64_at(d, 1)?, *d.get(12)?))
}

/// The network the stick is on, from the `ZDO_EXT_NWK_INFO` response: ShortAddr(2)
/// DevState PanId(2) ParentAddr(2) ExtendedPanId(8) ParentExtAddr(8) Channel.
///
/// This, not the configuration, is the truth once a network exists: `channel` and `pan_id` in
/// the config are only used to *form* one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkInfo {
    pub state: u8,
    pub pan_id: u16,
    pub extended_pan_id: u64,
    pub channel: u8,
}

pub fn parse_network_info(d: &[u8]) -> Option<NetworkInfo> {
    Some(NetworkInfo {
        state: *d.get(2)?,
        pan_id: u16_at(d, 3)?,
        extended_pan_id: u64_at(d, 7)?,
        channel: *d.get(23)?,
    })
}

/// The device id of an IEEE address: `zigbee-` and 16 lower-case hex digits, most significant
/// byte first (the way the address is printed on devices and by other tools).
pub fn device_id(ieee: u64) -> String {
    format!("zigbee-{ieee:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_match_the_spec_bytes() {
        // Written out from the MT document, not from Frame::new.
        assert_eq!(
            sys_reset_soft().encode().unwrap(),
            [0xFE, 0x01, 0x41, 0x00, 0x01, 0x41]
        );
        assert_eq!(
            permit_join(60).encode().unwrap(),
            [0xFE, 0x05, 0x25, 0x36, 0x0F, 0xFC, 0xFF, 0x3C, 0x00, 0x26]
        );
        assert_eq!(
            nv_write(ZCD_NV_PANID, &0x1a62u16.to_le_bytes())
                .encode()
                .unwrap(),
            [
                0xFE, 0x06, 0x21, 0x09, 0x83, 0x00, 0x00, 0x02, 0x62, 0x1A, 0xD7
            ]
        );
        assert_eq!(
            nv_read(ZCD_NV_BDBNODEISONANETWORK).encode().unwrap(),
            [0xFE, 0x03, 0x21, 0x08, 0x4F, 0x00, 0x00, 0x65]
        );
        assert_eq!(
            bdb_set_channel(true, 1 << 11).encode().unwrap(),
            [0xFE, 0x05, 0x2F, 0x08, 0x01, 0x00, 0x08, 0x00, 0x00, 0x2B]
        );
    }

    #[test]
    fn parses_network_info() {
        // Coordinator 0x0000, state 9, PAN 0x1a62, no parent, extended PAN
        // dd:dd:dd:dd:dd:dd:dd:dd, no parent, channel 15.
        let mut d = vec![0x00, 0x00, 0x09, 0x62, 0x1a, 0xfe, 0xff];
        d.extend([0xdd; 8]);
        d.extend([0x00; 8]);
        d.push(15);
        let n = parse_network_info(&d).unwrap();
        assert_eq!(
            n,
            NetworkInfo {
                state: 9,
                pan_id: 0x1a62,
                extended_pan_id: 0xdddd_dddd_dddd_dddd,
                channel: 15,
            }
        );
        assert!(parse_network_info(&d[..23]).is_none());
    }

    #[test]
    fn parses_announce_and_incoming() {
        let a = parse_announce(&[
            0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 0x34, 0x12, 0x00, 0x4b, 0x12, 0x00, 0x8e,
        ])
        .unwrap();
        assert_eq!(a.nwk, 0x1234);
        assert_eq!(device_id(a.ieee), "zigbee-00124b0012345678");
        assert!(parse_announce(&[0; 12]).is_none());
        let msg = [
            0, 0, 0x02, 0x04, 0x34, 0x12, 1, 1, 0, 200, 0, 0, 0, 0, 0, 7, 3, 0x18, 1, 0x0a,
        ];
        let m = parse_incoming(&msg).unwrap();
        assert_eq!((m.cluster, m.src, m.link_quality), (0x0402, 0x1234, 200));
        assert_eq!(m.payload, [0x18, 1, 0x0a]);
        assert!(parse_incoming(&msg[..19]).is_none());
    }
}

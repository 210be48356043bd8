#!/usr/bin/env python3
"""A TI Z-Stack 3.x coordinator simulator speaking MT/UNPI frames on a pseudo-terminal.

Frames are laid out by hand from TI's "Z-Stack Monitor and Test API" document (not with the
Outpost driver's encoder), so the end-to-end test catches encoder and decoder bugs:

    SOF 0xFE | LEN | CMD0 | CMD1 | DATA[LEN] | FCS (XOR of LEN..DATA)

Usage: znp_sim.py LINK STATE_FILE
  LINK        path of a symlink to the pty the driver opens (replaced atomically)
  STATE_FILE  "formed <channel> <pan id>" persisted here, like the stick's NV memory, across
              restarts: the network formed with the channel and PAN id the driver asked for

Answers the start-up SREQs (ZDO_EXT_NWK_INFO with the stored network). Reads commands on stdin,
one per line: announce, reports, corrupt, unknown, manufacturer, exit. Writes events on stdout,
one per line: "listening", "rx <cmd0> <cmd1> <hex>", "reset", "formation", "resumed", "ready",
"permit_join <seconds>".
"""

import os
import select
import sys
import tty

LINK, STATE = sys.argv[1], sys.argv[2]

# Device used by the commands: nwk 0x1234, IEEE 00:12:4b:00:12:34:56:78.
NWK = bytes([0x34, 0x12])
IEEE = bytes([0x78, 0x56, 0x34, 0x12, 0x00, 0x4B, 0x12, 0x00])


def event(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def frame(cmd0, cmd1, data=b""):
    body = bytes([len(data), cmd0, cmd1]) + bytes(data)
    fcs = 0
    for b in body:
        fcs ^= b
    return bytes([0xFE]) + body + bytes([fcs])


def af_incoming(cluster_lo, cluster_hi, zcl):
    """AF_INCOMING_MSG (AREQ 0x44 0x81): GroupId(2) ClusterId(2) SrcAddr(2) SrcEndpoint
    DstEndpoint WasBroadcast LinkQuality SecurityUse TimeStamp(4) TransSeqNumber Len Data
    MacSrcAddr(2) MsgResultRadius."""
    data = (
        bytes([0x00, 0x00, cluster_lo, cluster_hi])
        + NWK
        + bytes([0x01, 0x01, 0x00, 0x78, 0x00, 0x10, 0x27, 0x00, 0x00, 0x00, len(zcl)])
        + bytes(zcl)
        + NWK
        + bytes([0x01])
    )
    return frame(0x44, 0x81, data)


# ZCL Report Attributes: frame control 0x18 (global, server to client, no default response),
# sequence number, command 0x0a, then AttributeId(2) DataType Value.
REPORTS = [
    # temperature 0x0402/0x0000 int16 0x0866 = 2150 -> 21.5 °C
    af_incoming(0x02, 0x04, [0x18, 0x01, 0x0A, 0x00, 0x00, 0x29, 0x66, 0x08]),
    # humidity 0x0405/0x0000 uint16 0x1A0A = 6666 -> 66.66 %
    af_incoming(0x05, 0x04, [0x18, 0x02, 0x0A, 0x00, 0x00, 0x21, 0x0A, 0x1A]),
    # pressure 0x0403/0x0000 int16 0x03F5 = 1013 -> 1013 hPa
    af_incoming(0x03, 0x04, [0x18, 0x03, 0x0A, 0x00, 0x00, 0x29, 0xF5, 0x03]),
    # illuminance 0x0400/0x0000 uint16 0x7531 = 30001 -> 1000 lx
    af_incoming(0x00, 0x04, [0x18, 0x04, 0x0A, 0x00, 0x00, 0x21, 0x31, 0x75]),
    # occupancy 0x0406/0x0000 bitmap8 0x01 -> occupied
    af_incoming(0x06, 0x04, [0x18, 0x05, 0x0A, 0x00, 0x00, 0x18, 0x01]),
    # on/off 0x0006/0x0000 boolean 0x01 -> on
    af_incoming(0x06, 0x00, [0x18, 0x06, 0x0A, 0x00, 0x00, 0x10, 0x01]),
    # power configuration 0x0001: 0x0020 uint8 0x1E = 3.0 V, 0x0021 uint8 0xB4 = 90 %
    af_incoming(0x01, 0x00, [0x18, 0x07, 0x0A, 0x20, 0x00, 0x20, 0x1E, 0x21, 0x00, 0x20, 0xB4]),
    # Read Attributes Response (0x01) on temperature: AttributeId Status=0 DataType Value,
    # 0x0834 = 2100 -> 21.0 °C
    af_incoming(0x02, 0x04, [0x18, 0x08, 0x01, 0x00, 0x00, 0x00, 0x29, 0x34, 0x08]),
]

# Temperature report of -12.34 °C (0xFB2E = -1234), used around corrupted frames.
GOOD_A = af_incoming(0x02, 0x04, [0x18, 0x10, 0x0A, 0x00, 0x00, 0x29, 0x2E, 0xFB])
# Humidity 12.34 % (0x04D2 = 1234).
GOOD_B = af_incoming(0x05, 0x04, [0x18, 0x11, 0x0A, 0x00, 0x00, 0x21, 0xD2, 0x04])
# Pressure 999 hPa (0x03E7).
GOOD_C = af_incoming(0x03, 0x04, [0x18, 0x12, 0x0A, 0x00, 0x00, 0x29, 0xE7, 0x03])
# Temperature 99.99 °C (0x270F): sent only inside corrupted frames, must never be stored.
POISON = af_incoming(0x02, 0x04, [0x18, 0x13, 0x0A, 0x00, 0x00, 0x29, 0x0F, 0x27])


def corrupted():
    bad_fcs = bytearray(POISON)
    bad_fcs[-1] ^= 0x5A
    too_long = bytearray(POISON)
    too_long[1] += 3  # LEN claims 3 bytes more: overlaps the next frame
    too_short = bytearray(POISON)
    too_short[1] -= 4  # LEN claims 4 bytes less
    return b"".join(
        [bytes(bad_fcs), GOOD_A, bytes(too_long), GOOD_B, bytes(too_short), GOOD_C]
    )


# Unknown cluster 0xFC00 (manufacturer-specific frame, code 0x115F), attribute 0x0001,
# character string "abc"; an unknown attribute 0x0010 int16 on the temperature cluster; a
# cluster-specific command.
UNKNOWN = af_incoming(
    0x00, 0xFC, [0x1C, 0x5F, 0x11, 0x20, 0x0A, 0x01, 0x00, 0x42, 0x03, 0x61, 0x62, 0x63]
) + af_incoming(0x02, 0x04, [0x18, 0x21, 0x0A, 0x10, 0x00, 0x29, 0x05, 0x00]) + af_incoming(
    # IAS Zone 0x0500 cluster-specific command 0x00 Zone Status Change Notification (frame
    # control 0x19): ZoneStatus(2) = 0x0001, ExtendedStatus, ZoneId, Delay(2)
    0x00, 0x05, [0x19, 0x22, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00]
)

# A manufacturer-specific Report Attributes on the temperature cluster (frame control 0x1c:
# manufacturer-specific bit set, code 0x115F): attribute 0x0000 int16 0x0834 is the
# manufacturer's attribute, not MeasuredValue (21.0 °C).
MANUFACTURER = af_incoming(
    0x02, 0x04, [0x1C, 0x5F, 0x11, 0x30, 0x0A, 0x00, 0x00, 0x29, 0x34, 0x08]
)

# ZDO_END_DEVICE_ANNCE_IND (AREQ 0x45 0xC1): SrcAddr(2) NwkAddr(2) IEEEAddr(8) Capabilities.
ANNOUNCE = frame(0x45, 0xC1, NWK + NWK + IEEE + bytes([0x80]))


class Stick:
    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.state = 0  # devStates_t: 0 = hold, 9 = DEV_ZB_COORD
        stored = open(STATE).read().split() if os.path.exists(STATE) else []
        self.formed = stored[:1] == ["formed"]
        # The network: as stored, else what the driver asks for before formation.
        self.channel = int(stored[1]) if self.formed else 0
        self.pan_id = int(stored[2], 16) if self.formed else 0

    def send(self, data):
        os.write(self.fd, data)

    def srsp(self, cmd0, cmd1, data):
        self.send(frame(0x60 | (cmd0 & 0x1F), cmd1, data))

    def handle(self, cmd0, cmd1, data):
        event("rx %02x %02x %s" % (cmd0, cmd1, data.hex()))
        if (cmd0, cmd1) == (0x41, 0x00):  # SYS_RESET_REQ
            self.state = 0
            event("reset")
            # SYS_RESET_IND: Reason TransportRev ProductId MajorRel MinorRel HwRev
            self.send(frame(0x41, 0x80, bytes([0x00, 0x02, 0x01, 0x02, 0x07, 0x01])))
        elif (cmd0, cmd1) == (0x21, 0x01):  # SYS_PING -> Capabilities(2)
            self.srsp(cmd0, cmd1, bytes([0x59, 0x01]))
        elif (cmd0, cmd1) == (0x21, 0x02):  # SYS_VERSION
            self.srsp(cmd0, cmd1, bytes([0x02, 0x01, 0x02, 0x07, 0x01, 0x50, 0x43, 0x34, 0x01]))
        elif (cmd0, cmd1) == (0x27, 0x00):  # UTIL_GET_DEVICE_INFO
            ieee = bytes([0x01, 0x02, 0x03, 0x04, 0x05, 0x4B, 0x12, 0x00])
            self.srsp(cmd0, cmd1, bytes([0x00]) + ieee + bytes([0x00, 0x00, 0x07, self.state, 0x00]))
        elif (cmd0, cmd1) == (0x21, 0x08):  # SYS_OSAL_NV_READ Id(2) Offset -> Status Len Value
            if data[:2] == bytes([0x4F, 0x00]):  # ZCD_NV_BDBNODEISONANETWORK
                self.srsp(cmd0, cmd1, bytes([0x00, 0x01, 0x01 if self.formed else 0x00]))
            else:
                self.srsp(cmd0, cmd1, bytes([0x0A, 0x00]))  # NV_OPER_FAILED
        elif (cmd0, cmd1) == (0x27, 0x41):  # UTIL_ADDRMGR_NWK_ADDR_LOOKUP -> IEEE(8)
            self.srsp(cmd0, cmd1, IEEE if data == NWK else bytes(8))
        elif (cmd0, cmd1) == (0x25, 0x40):  # ZDO_STARTUP_FROM_APP
            if self.formed:
                self.srsp(cmd0, cmd1, bytes([0x00]))  # restored network state
                event("resumed")
                self.send(frame(0x45, 0xC0, bytes([0x08])))  # DEV_COORD_STARTING
                self.send(frame(0x45, 0xC0, bytes([0x09])))  # DEV_ZB_COORD
                self.state = 9
            else:
                self.srsp(cmd0, cmd1, bytes([0x01]))  # new network state
        elif (cmd0, cmd1) in ((0x21, 0x09), (0x2F, 0x08), (0x24, 0x00)):
            # SYS_OSAL_NV_WRITE, APP_CNF_BDB_SET_CHANNEL, AF_REGISTER -> Status
            if (cmd0, cmd1) == (0x21, 0x09) and data[:2] == bytes([0x83, 0x00]):
                # ZCD_NV_PANID: Id(2) Offset Len Value(2)
                self.pan_id = data[4] | data[5] << 8
            if (cmd0, cmd1) == (0x2F, 0x08) and data[0] == 1:
                # primary channel mask (4 bytes, little endian): one bit set
                mask = int.from_bytes(data[1:5], "little")
                self.channel = mask.bit_length() - 1
            self.srsp(cmd0, cmd1, bytes([0x00]))
        elif (cmd0, cmd1) == (0x2F, 0x05):  # APP_CNF_BDB_START_COMMISSIONING
            self.srsp(cmd0, cmd1, bytes([0x00]))
            event("formation")
            self.send(frame(0x45, 0xC0, bytes([0x08])))
            self.send(frame(0x45, 0xC0, bytes([0x09])))
            # APP_CNF_BDB_COMMISSIONING_NOTIFICATION: Status Mode RemainingModes
            self.send(frame(0x4F, 0x80, bytes([0x00, 0x04, 0x00])))
            self.state = 9
            self.formed = True
            with open(STATE, "w") as f:
                f.write("formed %d %04x" % (self.channel, self.pan_id))
        elif (cmd0, cmd1) == (0x25, 0x36):  # ZDO_MGMT_PERMIT_JOIN_REQ
            # AddrMode DstAddr(2) Duration TCSignificance
            self.srsp(cmd0, cmd1, bytes([0x00]))
            event("permit_join %d addr_mode=%02x dst=%02x%02x" % (data[3], data[0], data[2], data[1]))
            # ZDO_MGMT_PERMIT_JOIN_RSP: SrcAddr(2) Status
            self.send(frame(0x45, 0xB6, bytes([0x00, 0x00, 0x00])))
        elif (cmd0, cmd1) == (0x25, 0x50):  # ZDO_EXT_NWK_INFO
            # ShortAddr(2) DevState PanId(2) ParentAddr(2) ExtendedPanId(8) ParentExtAddr(8)
            # Channel
            self.srsp(
                cmd0,
                cmd1,
                bytes([0x00, 0x00, self.state])
                + self.pan_id.to_bytes(2, "little")
                + bytes([0xFE, 0xFF])
                + bytes([0xDD] * 8)
                + bytes(8)
                + bytes([self.channel]),
            )
            event("ready")  # the last request of the driver's start-up
        elif cmd0 >> 5 == 1:
            self.srsp(cmd0, cmd1, bytes([0x02]))  # unsupported: INVALID_PARAMETER

    def feed(self, data):
        self.buf += data
        while True:
            start = self.buf.find(b"\xFE")
            if start < 0:
                self.buf = b""
                return
            self.buf = self.buf[start:]
            if len(self.buf) < 2 or len(self.buf) < self.buf[1] + 5:
                return
            n = self.buf[1]
            body, fcs = self.buf[1 : n + 4], self.buf[n + 4]
            x = 0
            for b in body:
                x ^= b
            if x != fcs:
                event("bad_frame %s" % self.buf[: n + 5].hex())
                self.buf = self.buf[1:]
                continue
            self.buf = self.buf[n + 5 :]
            self.handle(body[1], body[2], bytes(body[3:]))


def main():
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    tmp = LINK + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.ttyname(slave), tmp)
    os.replace(tmp, LINK)
    stick = Stick(master)
    event("listening")
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([master, stdin], [], [])
        if master in ready:
            try:
                stick.feed(os.read(master, 4096))
            except OSError:
                pass  # no reader on the slave side yet
        if stdin in ready:
            line = sys.stdin.readline()
            cmd = line.strip()
            if cmd == "announce":
                stick.send(ANNOUNCE)
            elif cmd == "reports":
                stick.send(b"".join(REPORTS))
            elif cmd == "corrupt":
                stick.send(corrupted())
            elif cmd == "unknown":
                stick.send(UNKNOWN)
            elif cmd == "manufacturer":
                stick.send(MANUFACTURER)
            elif cmd == "exit" or not line:
                os.unlink(LINK)
                return
            event("sent " + cmd)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A real Modbus slave (pymodbus) with a known register map, for the driver tests.

    modbus_slave.py --tcp 127.0.0.1:5020 [--units 1,2] [--map test|bench]
    modbus_slave.py --rtu /path/to/pty [--units 1,2] [--map test|bench]

Prints "READY" on stdout once serving. Register map "test" (addresses as on the wire, 0-based):

  holding  0      u16   1234
  holding  1      i16   -42
  holding  2..3   u32   123456, big word order     (0x0001, 0xE240)
  holding  4..5   u32   123456, little word order  (0xE240, 0x0001)
  holding  6..7   f32   21.5, big word order       (0x41AC, 0x0000)
  holding  8..9   f32   21.5, little word order    (0x0000, 0x41AC)
  holding  10     i16   -215 (read with scale 0.1 → -21.5)
  holding  20..21 i32   -100000, big word order    (0xFFFE, 0x7960)
  holding  30     u16   0x3412 (read with byte_order little → 0x1234 = 4660)
  input    0      u16   500
  coils    0..2         True, False, True

Map "bench": holding 0..49 hold 0..49.
"""

import argparse
import asyncio
import sys

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer


def block(values, size=128):
    """A block for wire addresses 0..size-1.

    pymodbus' device context adds 1 to every wire address before looking it up in a block
    (its 1-based "register number" convention), so the block starts at 1 and wire address N is
    element N.
    """
    padded = list(values) + [0] * (size - len(values))
    return ModbusSequentialDataBlock(1, padded)


def test_map():
    hr = [0] * 40
    hr[0] = 1234
    hr[1] = (-42) & 0xFFFF
    hr[2], hr[3] = 0x0001, 0xE240
    hr[4], hr[5] = 0xE240, 0x0001
    hr[6], hr[7] = 0x41AC, 0x0000
    hr[8], hr[9] = 0x0000, 0x41AC
    hr[10] = (-215) & 0xFFFF
    hr[20], hr[21] = 0xFFFE, 0x7960
    hr[30] = 0x3412
    return ModbusDeviceContext(
        hr=block(hr),
        ir=block([500]),
        co=block([True, False, True], size=64),
        di=block([False] * 8, size=64),
    )


def bench_map():
    return ModbusDeviceContext(
        hr=block(list(range(50))),
        ir=block([]),
        co=block([], size=64),
        di=block([], size=64),
    )


async def main():
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", help="host:port to listen on")
    where.add_argument("--rtu", help="serial device (pty) to serve on")
    parser.add_argument("--units", default="1", help="comma-separated unit ids")
    parser.add_argument("--map", default="test", choices=["test", "bench"])
    args = parser.parse_args()

    make = test_map if args.map == "test" else bench_map
    units = [int(u) for u in args.units.split(",")]
    context = ModbusServerContext(devices={u: make() for u in units}, single=False)
    print("READY", flush=True)
    if args.tcp:
        host, port = args.tcp.rsplit(":", 1)
        await StartAsyncTcpServer(context=context, address=(host, int(port)))
    else:
        await StartAsyncSerialServer(
            context=context, port=args.rtu, baudrate=19200, timeout=0.05
        )


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)

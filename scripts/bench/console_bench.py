#!/usr/bin/env python3
"""The web console's figures (docs/BENCHMARKS.md, "Web console"):

1. First page load: the bytes of the page and its two assets, and the server time of each
   request on loopback (median and p99 of 200 requests each).
2. The live view's cost: the daemon's CPU (user + system, /proc) while a device publishes
   100 readings/s over MQTT QoS 1 for 20 s, without a viewer and with one viewer on the
   device's event stream (what the console's live view opens); rounds alternate, medians of 3.

    console_bench.py OUTPOST_BINARY
"""

import hashlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

BIN = sys.argv[1]
TOKEN = "bench-console-token-000000000000"
TICKS = os.sysconf("SC_CLK_TCK")


def start(directory):
    config = os.path.join(directory, "outpost.toml")
    with open(config, "w") as f:
        f.write(f"""[gateway]
data_dir = "{directory}/data"
[log]
format = "json"
[admin]
listen = "127.0.0.1:0"
socket = ""
[coap]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
[apps]
enabled = false
[[api.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
scopes = ["admin"]
""")
    proc = subprocess.Popen([BIN, "run", "--config", config], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    ports = {}
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        message = event.get("message", "")
        if message == "Admin listener bound":
            ports["admin"] = int(event["addr"].rsplit(":", 1)[1])
        if message == "MQTT listener bound":
            ports["mqtt"] = int(event["addr"].rsplit(":", 1)[1])
        if message.startswith("Outpost ready"):
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, ports


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def page_load(port):
    sizes, times = {}, {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/", "/console/app.js", "/console/app.css"):
        samples = []
        for _ in range(200):
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            data = response.read()
            samples.append((time.perf_counter() - started) * 1000)
        sizes[path] = len(data)
        samples.sort()
        times[path] = (statistics.median(samples), samples[int(len(samples) * 0.99) - 1])
    conn.close()
    return sizes, times


def viewer(port, device, stop, counter):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/api/v1/devices/{device}/readings",
                 headers={"Authorization": f"Bearer {TOKEN}", "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    while not stop.is_set():
        line = response.fp.readline()
        if not line:
            break
        if line.startswith(b"event: reading"):
            counter[0] += 1
    conn.close()


def publish_round(proc, ports, secret, watch, seconds=int(os.environ.get("CONSOLE_BENCH_SECONDS", "20")), rate=100):
    stop, counter = threading.Event(), [0]
    thread = None
    if watch:
        thread = threading.Thread(target=viewer, args=(ports["admin"], "bench-1", stop, counter), daemon=True)
        thread.start()
        time.sleep(0.5)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-1")
    client.username_pw_set("bench-1", secret)
    client.connect("127.0.0.1", ports["mqtt"])
    client.loop_start()
    time.sleep(0.5)
    before, started = cpu(proc.pid), time.monotonic()
    sent = 0
    while time.monotonic() - started < seconds:
        due = started + sent / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        client.publish("devices/bench-1/temp", json.dumps({"t": sent % 40, "n": sent}), qos=1)
        sent += 1
    elapsed = time.monotonic() - started
    share = (cpu(proc.pid) - before) / elapsed * 100
    client.loop_stop()
    client.disconnect()
    stop.set()
    if thread:
        thread.join(timeout=2)
    return share, sent, counter[0]


def main():
    with tempfile.TemporaryDirectory() as directory:
        proc, ports = start(directory)
        try:
            sizes, times = page_load(ports["admin"])
            status, body = request(ports["admin"], "POST", "/api/v1/devices", json.dumps({"id": "bench-1"}),
                                   {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            assert status == 201, body
            secret = json.loads(body)["secret"]
            without, with_viewer, seen = [], [], []
            for _ in range(3):
                share, _, _ = publish_round(proc, ports, secret, watch=False)
                without.append(share)
                share, sent, received = publish_round(proc, ports, secret, watch=True)
                with_viewer.append(share)
                seen.append(f"{received}/{sent}")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(f"page: {sum(sizes.values())} bytes ({', '.join(f'{p} {n}' for p, n in sizes.items())})")
    for path, (median, p99) in times.items():
        print(f"server time {path}: median {median:.2f} ms, p99 {p99:.2f} ms (200 requests, keep-alive)")
    print(f"daemon CPU at 100 readings/s, no viewer: median {statistics.median(without):.2f} % "
          f"({' / '.join(f'{x:.2f}' for x in without)})")
    print(f"daemon CPU at 100 readings/s, one live viewer: median {statistics.median(with_viewer):.2f} % "
          f"({' / '.join(f'{x:.2f}' for x in with_viewer)}); readings seen by the viewer: {', '.join(seen)}")
    print(f"the live view's cost: {statistics.median(with_viewer) - statistics.median(without):+.2f} points of a core")


main()

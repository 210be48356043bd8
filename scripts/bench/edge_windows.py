"""scripts/bench.sh edge: the resident memory 10,000 open aggregate windows cost.

Starts `outpost run` (the binary given) twice per round, without and with one aggregate rule
(window 1h, two fields, four functions), registers one device, posts one JSON reading to each
of 10,000 distinct topics over HTTP (one window per topic), waits 2 s and reads VmRSS. The
cost of the windows is the growth with the rule minus the growth without it (same readings,
same outbox work). Median of 3 rounds.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

KEYS = 10_000
RULE = """
[[edge.rules]]
name = "windows"
topic = "devices/+/#"
[edge.rules.aggregate]
window = "1h"
fields = ["temperature", "humidity"]
functions = ["count", "min", "max", "mean"]
"""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def run(binary, with_rule):
    with tempfile.TemporaryDirectory() as d:
        token = "bench-token"
        digest = hashlib.sha256(token.encode()).hexdigest()
        config = f"""[gateway]
data_dir = "{d}/data"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[coap]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
[[api.tokens]]
name = "bench"
sha256 = "{digest}"
scopes = ["admin"]
""" + (RULE if with_rule else "")
        with open(f"{d}/c.toml", "w") as f:
            f.write(config)
        log = open(f"{d}/log", "w+")
        p = subprocess.Popen([binary, "run", "--config", f"{d}/c.toml"], stderr=log)
        try:
            addr = None
            for _ in range(200):
                log.seek(0)
                text = log.read()
                m = re.search(r'"addr":"([^"]+)"[^\n]*Admin listener bound|Admin listener bound[^\n]*"addr":"([^"]+)"', text)
                if m and "Outpost ready" in text:
                    addr = m.group(1) or m.group(2)
                    break
                time.sleep(0.05)
            host, port = addr.rsplit(":", 1)
            c = http.client.HTTPConnection(host, int(port))
            c.request("POST", "/api/v1/devices", json.dumps({"id": "bench-device"}),
                      {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            secret = json.loads(c.getresponse().read())["secret"]
            auth = "Basic " + base64.b64encode(f"bench-device:{secret}".encode()).decode()
            time.sleep(1)
            before = rss_kib(p.pid)
            body = json.dumps({"temperature": 21.5, "humidity": 48.2})
            for i in range(KEYS):
                c.request("POST", f"/api/v1/ingest/devices/bench-device/k{i}", body,
                          {"Authorization": auth, "Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                assert r.status == 201, r.status
            time.sleep(2)
            after = rss_kib(p.pid)
            if with_rule:
                c.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
                metrics = c.getresponse().read().decode()
                open_windows = re.search(r"^outpost_edge_windows_open (\d+)", metrics, re.M)
                assert open_windows and int(open_windows.group(1)) == KEYS, metrics[:200]
            return after - before
        finally:
            p.terminate()
            p.wait()


def main():
    binary = sys.argv[1]
    costs = []
    for round_ in range(3):
        without = run(binary, False)
        with_rule = run(binary, True)
        cost = with_rule - without
        costs.append(cost)
        print(f"round {round_ + 1}: RSS growth without the rule {without} KiB, with it {with_rule} KiB: "
              f"{KEYS} windows cost {cost} KiB")
    print(f"{KEYS} open windows: median {statistics.median(costs) / 1024:.1f} MiB "
          f"({', '.join(str(c) for c in costs)} KiB)")


main()

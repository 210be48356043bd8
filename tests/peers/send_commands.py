#!/usr/bin/env python3
"""Sends commands to Outpost gateways the way a cloud backend does: with confluent-kafka (PyPI),
keyed by gateway id, partitioned like Kafka's Java clients (`murmur2_random`), for the commands
tests (tests/tests/kafka_commands.rs).

    send_commands.py BOOTSTRAP TOPIC [PAUSE_SECONDS [SETTINGS_JSON]] < commands.jsonl

Each input line is {"gateway": id, "value": <JSON command>} or {"gateway": id, "raw": text} (a
record that is not JSON). Prints one line per record once Kafka acknowledged it:
{"partition": p, "offset": o}, pausing PAUSE_SECONDS (default 0) after each. Exits non-zero on
the first failed delivery. SETTINGS_JSON is an object of further librdkafka settings (TLS,
SASL), as a backend of a secured cluster sets them.
"""

import json
import sys
import time

from confluent_kafka import Producer


def main() -> int:
    bootstrap, topic = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    settings = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    producer = Producer({
        "bootstrap.servers": bootstrap,
        # What a Java producer does by default: the partition is murmur2(key) mod partitions.
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        **settings,
    })
    results = []

    def delivered(error, message):
        results.append((error, message))

    for line in sys.stdin:
        if not line.strip():
            continue
        entry = json.loads(line)
        value = entry["raw"] if "raw" in entry else json.dumps(entry["value"])
        producer.produce(topic, key=entry["gateway"], value=value, on_delivery=delivered)
        producer.flush(30)
        error, message = results[-1]
        if error is not None:
            print(f"delivery failed: {error}", file=sys.stderr)
            return 1
        print(json.dumps({"partition": message.partition(), "offset": message.offset()}), flush=True)
        time.sleep(pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())

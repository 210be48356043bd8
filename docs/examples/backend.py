#!/usr/bin/env python3
"""A cloud backend for Outpost gateways, in one page: read readings with their headers, send a
command to a device, wait until the device acknowledged it (docs/KAFKA.md, "Commands from the
cloud"). Needs confluent-kafka (`pip install confluent-kafka`). The test suite runs this very file
against the real gateway (tests/tests/kafka_commands.rs), so it cannot rot.

    python3 backend.py --bootstrap kafka:9092 --gateway gw-17 --device valve-7 \
        --name open --payload '{"percent": 40}'

Exits 0 once the command is acked, 1 if it is rejected or expires, 2 on a timeout.
"""

import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING


def read_readings(bootstrap, topic, count, timeout):
    """Prints up to `count` readings from the start of `topic` with Outpost's headers."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "quickstart-readings",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    deadline = time.time() + timeout
    seen = 0
    while seen < count and time.time() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        headers = {k: v.decode() for k, v in (message.headers() or [])}
        print(f"reading from {headers['outpost-device']} (gateway {headers['outpost-gateway']}, "
              f"seq {headers['outpost-seq']}, topic {headers['outpost-topic']}): "
              f"{message.value().decode(errors='replace')}", flush=True)
        seen += 1
    consumer.close()
    return seen


def send_command(bootstrap, topic, gateway, command):
    """Writes `command` keyed by the gateway id, partitioned as the gateway expects."""
    # murmur2_random is what Java clients do by default: the gateway reads exactly the
    # partition murmur2(gateway id) selects. librdkafka's own default would pick another.
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "enable.idempotence": True})
    producer.produce(topic, key=gateway, value=json.dumps(command))
    if producer.flush(30) != 0:
        raise RuntimeError("the command was not delivered to Kafka")


def wait_for_outcome(consumer, command_id, timeout):
    """Prints the command's status events until it is acked, rejected or expired."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        event = json.loads(message.value())
        if event.get("command_id") != command_id:
            continue
        print(f"command {command_id}: {event['status']} at {event['at']}"
              + (f", result {json.dumps(event['result'])}" if "result" in event else "")
              + (f", reason: {event['reason']}" if "reason" in event else ""), flush=True)
        if event["status"] == "acked":
            return 0
        if event["status"] in ("rejected", "expired"):
            return 1
    print(f"command {command_id}: no outcome within {timeout} s", file=sys.stderr)
    return 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--gateway", required=True, help="the gateway id (gateway_id in /api/v1/status)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--name", default="ping")
    parser.add_argument("--payload", default="null", help="JSON arguments")
    parser.add_argument("--ttl", type=int, default=300, help="seconds the command may wait")
    parser.add_argument("--readings", type=int, default=1, help="readings to show first")
    parser.add_argument("--readings-topic", default="outpost.readings")
    parser.add_argument("--commands-topic", default="outpost.commands")
    parser.add_argument("--status-topic", default="outpost.command-status")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    read_readings(args.bootstrap, args.readings_topic, args.readings, args.timeout)

    # Listen for status events before sending, from the end of the topic: only what follows.
    status = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "quickstart-status",
                       "enable.auto.commit": False})
    partitions = status.list_topics(args.status_topic, timeout=10).topics[args.status_topic].partitions
    ends = [TopicPartition(args.status_topic, p, status.get_watermark_offsets(
        TopicPartition(args.status_topic, p), timeout=10)[1]) for p in partitions]
    status.assign(ends)

    command = {"id": f"quickstart-{uuid.uuid4()}", "device": args.device, "name": args.name,
               "payload": json.loads(args.payload), "ttl_s": args.ttl}
    send_command(args.bootstrap, args.commands_topic, args.gateway, command)
    print(f"sent command {command['id']} ({args.name}) to {args.device} on {args.gateway}", flush=True)
    outcome = wait_for_outcome(status, command["id"], args.timeout)
    status.close()
    return outcome


if __name__ == "__main__":
    sys.exit(main())

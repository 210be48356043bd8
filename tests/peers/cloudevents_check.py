#!/usr/bin/env python3
"""Reads Kafka records with the CloudEvents SDK for Python (`cloudevents` from PyPI), for the
CloudEvents test: what another language's SDK makes of Outpost's events.

    cloudevents_check.py < records.jsonl

Each input line is one Kafka record as JSON: {"headers": {name: base64 value}, "key": base64 or
null, "value": base64}. A record whose `content-type` header is application/cloudevents+json is
read with `from_structured`, any other with `from_binary`; both raise on a record that is not a
valid CloudEvent (a missing required attribute, a wrong spec version). On top of the SDK's own
checks, `time` must parse as RFC 3339.

Prints one JSON line per record: the event's attributes, and its data as "data" (JSON) or
"data_base64" (bytes). Exits non-zero, naming the record, on the first invalid one.
"""

import base64
import datetime
import json
import sys

from cloudevents.kafka import KafkaMessage, from_binary, from_structured


def main() -> int:
    for number, line in enumerate(sys.stdin, start=1):
        record = json.loads(line)
        headers = {k: base64.b64decode(v) for k, v in record["headers"].items()}
        key = base64.b64decode(record["key"]) if record["key"] is not None else None
        message = KafkaMessage(headers=headers, key=key, value=base64.b64decode(record["value"]))
        content_type = headers.get("content-type", b"").decode()
        try:
            if content_type.startswith("application/cloudevents+json"):
                event = from_structured(message)
            else:
                event = from_binary(message, data_unmarshaller=lambda data: data)
            datetime.datetime.fromisoformat(event["time"])
        except Exception as error:  # the test shows whatever the SDK refused
            print(f"record {number} is not a valid CloudEvent: {error!r}", file=sys.stderr)
            return 1
        out = {name: value for name, value in event.get_attributes().items()}
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            out["data_base64"] = base64.b64encode(data).decode()
        else:
            out["data"] = data
        print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

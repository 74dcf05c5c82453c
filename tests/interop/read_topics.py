#!/usr/bin/env python3
"""Reads the bookstore topics the way a subscriber in another language would.

Uses confluent-kafka for Kafka, fastavro for Avro, and nothing of the producer's but the
`.avsc` files in schemas/: the single-object header's fingerprint is computed here from each
file's parsing canonical form (CRC-64-AVRO, as the Avro specification defines it), and a
Confluent-framed value's writer schema is fetched from the registry by id and read with the
file's schema as the reader schema.

Prints one JSON object per record (topic, partition, offset, key, headers, type, data) and
exits non-zero if a record cannot be decoded or fewer than --expect records arrive in time.
"""

import argparse
import io
import json
import pathlib
import struct
import sys
import time
import urllib.request

import fastavro
from confluent_kafka import Consumer, KafkaError
from fastavro.schema import parse_schema, to_parsing_canonical_form

CRC64_EMPTY = 0xC15D213AA4D7A795


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint of the Avro specification ("Schema Fingerprints")."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def load_schemas(folder: pathlib.Path):
    by_header, by_name = {}, {}
    for path in sorted(folder.glob("*.avsc")):
        schema = parse_schema(json.loads(path.read_text()))
        canonical = to_parsing_canonical_form(schema)
        header = b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical.encode()))
        by_header[header] = schema
        by_name[schema["name"]] = schema
    return by_header, by_name


class Decoder:
    def __init__(self, schemas: pathlib.Path, registry_url: str | None):
        self.by_header, self.by_name = load_schemas(schemas)
        self.registry_url = registry_url
        self.by_id = {}

    def decode(self, value: bytes):
        if value[:2] == b"\xc3\x01":
            schema = self.by_header.get(value[:10])
            if schema is None:
                raise ValueError(f"unknown fingerprint {value[2:10].hex()}")
            return schema["name"], self.read(value[10:], schema, schema)
        if value[:1] == b"\x00":
            (schema_id,) = struct.unpack(">I", value[1:5])
            writer = self.registry_schema(schema_id)
            reader = self.by_name[writer["name"]]
            return writer["name"], self.read(value[5:], writer, reader)
        raise ValueError(f"unknown framing, first byte {value[:1].hex()}")

    def registry_schema(self, schema_id: int):
        if schema_id not in self.by_id:
            if not self.registry_url:
                raise ValueError(f"Confluent-framed value (id {schema_id}) but no --registry-url")
            url = f"{self.registry_url.rstrip('/')}/schemas/ids/{schema_id}"
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
            self.by_id[schema_id] = parse_schema(json.loads(body["schema"]))
        return self.by_id[schema_id]

    @staticmethod
    def read(datum: bytes, writer, reader):
        buffer = io.BytesIO(datum)
        record = fastavro.schemaless_reader(buffer, writer, reader)
        if buffer.tell() != len(datum):
            raise ValueError(f"{len(datum) - buffer.tell()} bytes left after the datum")
        return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", action="append", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--schemas", type=pathlib.Path, required=True)
    parser.add_argument("--registry-url")
    parser.add_argument("--expect", type=int, required=True, help="records to read")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    decoder = Decoder(args.schemas, args.registry_url)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap_servers,
        "group.id": args.group,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe(args.topic)
    received, deadline = 0, time.monotonic() + args.timeout
    try:
        while received < args.expect and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                print(f"consumer error: {message.error()}", file=sys.stderr)
                return 2
            value = message.value()
            record_type, data = (None, None) if value is None else decoder.decode(value)
            headers = {k: v.decode() if v is not None else None for k, v in message.headers() or []}
            print(json.dumps({
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key": message.key().decode(),
                "headers": headers,
                "type": record_type,
                "data": data,
            }, default=str), flush=True)
            received += 1
    finally:
        consumer.close()
    if received < args.expect:
        print(f"only {received} of {args.expect} records within {args.timeout}s", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

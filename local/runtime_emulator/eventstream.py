"""AWS event-stream encoding (application/vnd.amazon.eventstream) for InvokeEndpointWithResponseStream.

Hand-written because botocore ships only the decoder and the encoders that exist (awscrt) pull in a
native client runtime for about thirty lines of framing. Tests check every frame with botocore's own
parser (botocore.eventstream.EventStreamBuffer), which is the one a real client runs.

Wire layout, big-endian:
    [total_len u32][headers_len u32][crc32(prelude) u32][headers][payload][crc32(all of the above) u32]
    header := [name_len u8][name][type u8 = 7 (string)][value_len u16][value]
"""

from __future__ import annotations

import json
import struct
import zlib

_STRING = 7
PRELUDE_BYTES = 12
CRC_BYTES = 4
# botocore rejects larger payloads per message (eventstream._MAX_PAYLOAD_LENGTH is 24 MiB);
# staying far below keeps every part cheap to re-frame.
MAX_PART_BYTES = 1 << 20


def encode_headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode("utf-8")
        raw_value = value.encode("utf-8")
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(encoded_headers: bytes, payload: bytes) -> bytes:
    """Frame one message from already-encoded headers (so hot paths encode constant headers once)."""
    total = PRELUDE_BYTES + len(encoded_headers) + len(payload) + CRC_BYTES
    prelude = struct.pack(">II", total, len(encoded_headers))
    prelude_crc = zlib.crc32(prelude)
    head = prelude + struct.pack(">I", prelude_crc)
    # The message CRC covers prelude, prelude CRC, headers and payload: continue the CRC over the parts
    # rather than concatenating a copy of the payload first.
    crc = zlib.crc32(payload, zlib.crc32(encoded_headers, zlib.crc32(head)))
    return b"".join((head, encoded_headers, payload, struct.pack(">I", crc & 0xFFFFFFFF)))


_PAYLOAD_PART_HEADERS = encode_headers(
    {
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }
)


def payload_part(data: bytes) -> bytes:
    """One or more PayloadPart events carrying `data` (split only if it is unusually large)."""
    if len(data) <= MAX_PART_BYTES:
        return encode_message(_PAYLOAD_PART_HEADERS, data)
    return b"".join(
        encode_message(_PAYLOAD_PART_HEADERS, data[i : i + MAX_PART_BYTES]) for i in range(0, len(data), MAX_PART_BYTES)
    )


def stream_exception(exception_type: str, message: str, error_code: str | None = None) -> bytes:
    """An in-stream modeled exception (ModelStreamError / InternalStreamFailure); boto3 raises it as
    botocore.exceptions.EventStreamError with Error.Code == exception_type."""
    body: dict[str, str] = {"Message": message}
    if error_code is not None:
        body["ErrorCode"] = error_code
    headers = encode_headers(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        }
    )
    return encode_message(headers, json.dumps(body).encode("utf-8"))

"""The bulk data channel's wire format, shared by the coordinator and the contributor client.

Why a channel beside gRPC: grpc-python moves 250-450 MB/s of upload chunks on a loopback that
copies 1.7 GB/s, so large experts stream over a plain TCP (or TLS) connection instead, opened
with a single-use ticket from the ``StartBulkUpload`` RPC (docs/upload-protocol.md).

One connection carries one run of bytes of one upload, after a fixed request header::

    request  = "MOEB" | version u8 | len(upload_id) u8 | ticket 32 bytes | offset u64 | count u64
               | upload_id (ASCII) | count bytes of the upload, from offset
    reply    = "MOER" | code u8 | held u64 | len(message) u16 | message (UTF-8)

Integers are big-endian. ``code`` is a gRPC status code number (0 = OK). The coordinator
replies twice: once after the header (OK = "send the bytes", else the refusal, before any byte
is sent), and once after the bytes (OK with ``held``, the bytes it now holds, or an error).
Nothing here is ever unpickled.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = b"MOEB"
REPLY_MAGIC = b"MOER"
VERSION = 1
TICKET_BYTES = 32
REQUEST = struct.Struct("!4sBB32sQQ")
REPLY = struct.Struct("!4sBQH")
MAX_MESSAGE = 4000

RecvInto = Callable[[memoryview], int]  # a socket's recv_into


class ProtocolError(ValueError):
    """Bytes that do not follow the format above."""


@dataclass(frozen=True)
class Request:
    ticket: bytes
    upload_id: str
    offset: int
    count: int

    def encode(self) -> bytes:
        name = self.upload_id.encode("ascii")
        header = REQUEST.pack(MAGIC, VERSION, len(name), self.ticket, self.offset, self.count)
        return header + name


@dataclass(frozen=True)
class Reply:
    code: int
    held: int
    message: str = ""

    def encode(self) -> bytes:
        text = self.message.encode("utf-8")[:MAX_MESSAGE]
        return REPLY.pack(REPLY_MAGIC, self.code, self.held, len(text)) + text


def read_exactly(recv_into: RecvInto, count: int) -> bytes:
    """``count`` bytes from a socket's ``recv_into``; ProtocolError if it closes first."""
    buffer = bytearray(count)
    view, filled = memoryview(buffer), 0
    while filled < count:
        got = recv_into(view[filled:])
        if not got:
            raise ProtocolError(f"connection closed after {filled} of {count} header bytes")
        filled += got
    return bytes(buffer)


def read_request(recv_into: RecvInto) -> Request:
    magic, version, name_len, ticket, offset, count = REQUEST.unpack(
        read_exactly(recv_into, REQUEST.size)
    )
    if magic != MAGIC:
        raise ProtocolError("not a moerge bulk upload (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"bulk protocol version {version} is not supported (want {VERSION})")
    name = read_exactly(recv_into, name_len)
    try:
        upload_id = name.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("upload_id is not ASCII") from None
    return Request(ticket=ticket, upload_id=upload_id, offset=offset, count=count)


def read_reply(recv_into: RecvInto) -> Reply:
    magic, code, held, length = REPLY.unpack(read_exactly(recv_into, REPLY.size))
    if magic != REPLY_MAGIC:
        raise ProtocolError("not a moerge bulk upload reply (bad magic)")
    message = read_exactly(recv_into, length).decode("utf-8", "replace")
    return Reply(code=code, held=held, message=message)

"""The ids tether makes (requests, decisions): a version-4 UUID's 32 hex digits, the
same bits `uuid.uuid4().hex` gives, without building a UUID object on the hot path."""

from __future__ import annotations

import os


def new_id() -> str:
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40  # version 4
    b[8] = b[8] & 0x3F | 0x80  # the RFC 4122 variant
    return b.hex()

"""Reading a central copy of audit logs: the audit lines in NDJSON or RFC 5424 files.

What a shipper delivers is the exact line bytes tether wrote (canonical JSON),
one a line in a file a collector wrote: either bare (stdout, HTTP batch, most
collectors' file outputs) or as the MSG of an RFC 5424 syslog line (an rsyslog
template such as RSYSLOG_SyslogProtocol23Format). Anything else in the file is
reported as a line that is not an audit record, never guessed at.

Total and bounded on hostile files: a line longer than `max_line` bytes is
skipped in chunks (memory stays bounded) and reported; every other line is one
`SourceLine`, whatever its bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

DEFAULT_MAX_LINE = 64 * 1024 * 1024  # a record with a 1 MB argument of escapes is ~6 MB
_BOM = b"\xef\xbb\xbf"
# <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID: each header field is one
# run of non-space characters, so the match is linear.
_HEADER = re.compile(rb"<\d{1,3}>\d{1,2}(?: [^ ]+){5} ")


@dataclass(frozen=True, slots=True)
class SourceLine:
    file: str
    number: int
    data: bytes | None  # the audit line; None: not one (see `why`)
    why: str = ""


def syslog_message(raw: bytes) -> bytes | None:
    """The MSG of an RFC 5424 line, without a leading BOM; None if the line is not one
    or carries no MSG. Structured data is skipped by its grammar (quoted values with
    backslash escapes), so a `{` inside it is never taken for the record."""
    m = _HEADER.match(raw)
    if m is None:
        return None
    i, n = m.end(), len(raw)
    if raw[i:i + 1] == b"-":
        i += 1
    elif raw[i:i + 1] == b"[":
        quoted = False
        while i < n:
            c = raw[i]
            if quoted:
                if c == 0x5C:  # backslash: the next byte is escaped
                    i += 2
                    continue
                quoted = c != 0x22
            elif c == 0x22:
                quoted = True
            elif c == 0x5D and raw[i + 1:i + 2] != b"[":  # the last element's `]`
                i += 1
                break
            i += 1
        else:
            return None
    else:
        return None
    if raw[i:i + 1] != b" ":
        return None
    msg = raw[i + 1:]
    return msg[len(_BOM):] if msg.startswith(_BOM) else msg


def audit_line(raw: bytes) -> bytes | None:
    # A collector's template may put a space before the message; a canonical line
    # never starts or ends with whitespace, so what is left is the line tether wrote.
    line = (raw[:-1] if raw.endswith(b"\r") else raw).lstrip(b" \t")
    if line.startswith(b"{"):
        return line
    if line.startswith(b"<"):
        return syslog_message(line)
    return None


def _lines(f: BinaryIO, max_line: int) -> Iterator[bytes | None]:
    """Lines without their newline; None for a line over `max_line` (skipped in chunks)."""
    while True:
        chunk = f.readline(max_line + 1)
        if not chunk:
            return
        if len(chunk) <= max_line or (chunk.endswith(b"\n") and len(chunk) == max_line + 1):
            yield chunk[:-1] if chunk.endswith(b"\n") else chunk
            continue
        while not chunk.endswith(b"\n"):
            chunk = f.readline(1 << 20)
            if not chunk:
                break
        yield None


def read_source(name: str, f: BinaryIO, max_line: int = DEFAULT_MAX_LINE) -> Iterator[SourceLine]:
    for number, raw in enumerate(_lines(f, max_line), start=1):
        if raw is None:
            yield SourceLine(name, number, None, f"longer than {max_line} bytes: skipped")
            continue
        if not raw.strip():
            continue
        line = audit_line(raw)
        yield SourceLine(name, number, line, "" if line is not None else
                         "neither a JSON record nor an RFC 5424 line carrying one")

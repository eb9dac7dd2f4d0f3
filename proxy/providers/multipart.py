"""A strict reader of `multipart/form-data`, for the uploads tether must read.

Strict because two parsers must not read one body two ways: tether judges what it
reads, the upstream acts on what it reads. So only the plain form is accepted:
one `boundary` parameter, CRLF line ends, the body starting at its first
delimiter and ending at the close delimiter, every part with exactly one
`Content-Disposition: form-data; name="..."` (no RFC 2231 `name*=`), no
`Content-Transfer-Encoding`, and at most `MAX_PARTS` parts. Anything else is a
BadRequest. Every search is a `bytes.find`, so the cost is linear and small even
for a body of only line ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadRequest

MAX_PARTS = 16  # an upload has a handful of fields; more is not an upload tether reads
_BOUNDARY = re.compile(r'(?i)(?:^|;)\s*boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))\s*(?=;|$)')
_NAME = re.compile(r'(?i)(?:^|;)\s*(name\*?|filename\*?)=(?:"([^"]*)"|([^";\s]*))\s*(?=;|$)')


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    data: bytes


def is_form_data(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "multipart/form-data"


def read_form(content_type: str, body: bytes) -> list[Part]:
    """The parts of a `multipart/form-data` body, in order."""
    found = _BOUNDARY.findall(content_type.split(";", 1)[1] if ";" in content_type else "")
    if len(found) != 1:
        raise _malformed("the Content-Type must name exactly one boundary")
    delimiter = b"--" + (found[0][0] or found[0][1]).encode("latin-1")
    if not body.startswith(delimiter):
        raise _malformed("the body does not start with its boundary")
    parts: list[Part] = []
    pos = len(delimiter)
    while body[pos:pos + 2] != b"--":
        if body[pos:pos + 2] != b"\r\n":
            raise _malformed("a boundary is not followed by CRLF")
        end = body.find(b"\r\n" + delimiter, pos + 2)
        if end < 0:
            raise _malformed("the body has no close delimiter")
        if len(parts) == MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        parts.append(_part(body[pos + 2:end]))
        pos = end + 2 + len(delimiter)
    if body[pos + 2:] not in (b"", b"\r\n"):
        raise _malformed("bytes follow the close delimiter")
    return parts


def _part(raw: bytes) -> Part:
    head, sep, data = raw.partition(b"\r\n\r\n")
    if not sep:
        raise _malformed("a part has no blank line after its headers")
    disposition: list[str] = []
    for line in head.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or name != name.strip():
            raise _malformed("a part header is not 'Name: value'")
        if name.lower() == "content-transfer-encoding":
            raise _malformed("a part has a Content-Transfer-Encoding, which servers decode "
                             "differently")
        if name.lower() == "content-disposition":
            disposition.append(value.strip())
    if len(disposition) != 1:
        raise _malformed("a part must have exactly one Content-Disposition")
    kind, _, params = disposition[0].partition(";")
    names: dict[str, str] = {}
    for key, quoted, token in _NAME.findall(params):
        key = key.lower()
        if key.endswith("*") or key in names:
            raise _malformed(f"a part's Content-Disposition repeats or encodes '{key}'")
        names[key] = quoted or token
    if kind.strip().lower() != "form-data" or not names.get("name"):
        raise _malformed("a part is not form-data with a name")
    return Part(names["name"], names.get("filename"), data)


def _malformed(reason: str) -> BadRequest:
    return BadRequest(f"the multipart upload is malformed: {reason}; it was not forwarded")

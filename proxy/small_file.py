"""A small regular file read without blocking the event loop.

Used wherever tether reads a file named in its config at request time (upstream key
files, JWKS files, token files for a key-set fetch): both front ends and auth/ reach
it, so it sits below all of them.
"""

from __future__ import annotations

import errno
import os
import stat


def read_small_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, refused (OSError) beyond `limit`. These reads run on the
    event loop, so the file is opened without blocking and checked before a byte is
    read: a FIFO (whose read would wait for a writer and stall every request), a
    device or a directory is refused, and a huge file is never read into memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        data = bytearray()
        while chunk := os.read(fd, limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise OSError(errno.EFBIG, f"is over {limit} bytes")
        return bytes(data)
    finally:
        os.close(fd)

"""`tether audit verify --merged FILE...`: the files of a central copy, checked per instance.

Exit status: 0 every instance verifies (an unsigned tail is a warning), 1 one
has a gap, an altered record, a bad signature or a malformed record (or an
unsigned tail, with `--require-signed-tail`), 2 a file or key cannot be read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .central_read import DEFAULT_MAX_LINE, read_source
from .chain import chain_files
from .signing import KeyFileError, Keyring
from .verify_merged import Collector, failed, render_json, render_text


def _expand(target: str) -> list[Path]:
    """A file as given; a directory or a base path with rotated files: all of them
    (order does not matter here)."""
    path = Path(target)
    if path.is_dir() or any(path.parent.glob(path.name + ".[0-9]*")):
        return chain_files(path)
    return [path]


def verify_merged(files: Sequence[str], *, public_keys: Sequence[str] = (),
                  hmac_keys: Sequence[str] = (), require_signed_tail: bool = False,
                  partial: bool = False, as_json: bool = False,
                  max_line: int = DEFAULT_MAX_LINE, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    keys = Keyring()
    try:
        for key in public_keys:
            keys.add_public_key(key)
        for key in hmac_keys:
            keys.add_hmac_key(key)
    except KeyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    collector = Collector(keys)
    for target in files:
        try:
            if target == "-":
                collector.add_all(read_source("<stdin>", sys.stdin.buffer, max_line))
                continue
            for path in _expand(target):
                with path.open("rb") as f:
                    collector.add_all(read_source(str(path), f, max_line))
        except (OSError, ValueError) as e:
            print(f"error: {target}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
    reports = collector.reports(partial=partial)
    if as_json:
        print(render_json(reports, collector.notes, require_signed_tail=require_signed_tail),
              file=out)
    else:
        print(render_text(reports, collector.notes, require_signed_tail=require_signed_tail,
                          keys_given=bool(public_keys or hmac_keys)), file=out)
    return 1 if failed(reports, require_signed_tail=require_signed_tail) else 0

"""Signed chain heads: the keys that sign them and the keyring that checks them.

A `chain_head` record (log.py writes one periodically and at shutdown) is a
record of the chain like any other: it has its `seq` and its `prev`, and `head`
repeats `prev`, the SHA-256 of the line before it. Its `sig` covers the
canonical bytes of the record without `sig` (instance, seq, head, time, alg,
key_id), so a valid head vouches, through the hash chain, for every record of
its instance before it. Hashes alone need no key - anyone who edits a record
can rewrite the chain after it - the signature is what they cannot redo.

Two algorithms: `ed25519` (a PEM private key signs; the public key, which may be
handed to anyone, verifies) and `hmac-sha256` (one shared secret signs and
verifies). `key_id` is a fingerprint of the key, so a reader can tell which key
signed; it is informational: verification tries every given key of the alg.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..config_nodes import as_map, check_keys, err
from ..config_tables_run import SIGN
from ..policy.rules import parse_duration
from ..policy.source import YMap
from .chain import canonical

HEAD_KIND = "chain_head"
MIN_HMAC_BYTES = 16


class Alg(enum.StrEnum):
    ED25519 = "ed25519"
    HMAC_SHA256 = "hmac-sha256"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


def payload(record: Mapping[str, object]) -> bytes:
    """The bytes a head's signature covers: the canonical record without `sig`."""
    return canonical({k: v for k, v in record.items() if k != "sig"})


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror or e}") from e


def _ed25519_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _hmac_secret(path: str) -> bytes:
    # A secret written with `echo` ends in a newline that `kubectl create secret
    # --from-literal` would not have; both mean the same key.
    secret = _read(path).rstrip(b"\r\n")
    if len(secret) < MIN_HMAC_BYTES:
        raise KeyFileError(f"{path}: an HMAC secret needs at least {MIN_HMAC_BYTES} bytes "
                        f"(got {len(secret)}; make one with `openssl rand -hex 32`)")
    return secret


def _hmac_id(secret: bytes) -> str:
    return "hmac:" + hashlib.sha256(b"tether hmac key id\0" + secret).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Signer:
    """The key an instance signs its heads with, loaded once at start."""

    alg: Alg
    key_id: str
    _ed25519: Ed25519PrivateKey | None = None
    _secret: bytes = b""

    def sign(self, record: Mapping[str, object]) -> str:
        data = payload(record)
        if self._ed25519 is not None:
            raw = self._ed25519.sign(data)
        else:
            raw = hmac.new(self._secret, data, hashlib.sha256).digest()
        return base64.b64encode(raw).decode("ascii")


def load_signer(alg: Alg, key_file: str) -> Signer:
    """Raises KeyFileError naming the file when it cannot be read or is not such a key."""
    if alg is Alg.HMAC_SHA256:
        secret = _hmac_secret(key_file)
        return Signer(alg, _hmac_id(secret), _secret=secret)
    data = _read(key_file)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{key_file}: not an unencrypted PEM private key ({e}); make one with "
                        "`openssl genpkey -algorithm ed25519 -out KEY`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{key_file}: a {type(key).__name__}, not an Ed25519 private key")
    return Signer(alg, _ed25519_id(key.public_key()), _ed25519=key)


class HeadCheck(enum.Enum):
    VALID = "valid"
    BAD = "bad signature"               # no given key of its alg verifies it
    NO_KEY = "no key given"             # no key of its alg was given: not checked
    MALFORMED = "malformed head"        # alg/sig/head missing or wrong


@dataclass(slots=True)
class Keyring:
    """The keys `tether audit verify` checks heads with."""

    public: list[Ed25519PublicKey] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # key ids, for the report

    def add_public_key(self, path: str) -> None:
        """A PEM public key; a PEM private key is accepted too (its public half is used)."""
        data = _read(path)
        key: object
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            try:
                key = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise KeyFileError(f"{path}: not a PEM Ed25519 public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
        self.public.append(key)
        self.names.append(_ed25519_id(key))

    def add_hmac_key(self, path: str) -> None:
        secret = _hmac_secret(path)
        self.secrets.append(secret)
        self.names.append(_hmac_id(secret))

    def check(self, record: Mapping[str, object]) -> HeadCheck:
        alg, sig = record.get("alg"), record.get("sig")
        if record.get("head") != record.get("prev") or not isinstance(sig, str):
            return HeadCheck.MALFORMED
        try:
            raw = base64.b64decode(sig.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            return HeadCheck.MALFORMED
        data = payload(record)
        if alg == Alg.ED25519:
            if not self.public:
                return HeadCheck.NO_KEY
            for key in self.public:
                try:
                    key.verify(raw, data)
                    return HeadCheck.VALID
                except InvalidSignature:
                    continue
            return HeadCheck.BAD
        if alg == Alg.HMAC_SHA256:
            if not self.secrets:
                return HeadCheck.NO_KEY
            for secret in self.secrets:
                if hmac.compare_digest(hmac.new(secret, data, hashlib.sha256).digest(), raw):
                    return HeadCheck.VALID
            return HeadCheck.BAD
        return HeadCheck.MALFORMED


@dataclass(frozen=True, slots=True)
class SignSettings:
    """`audit.sign`: the key is loaded when the config is, so an unreadable or wrong
    key file is a config error at start, never a surprise at the first head."""

    alg: Alg
    key_file: str
    interval_s: float = 60.0
    signer: Signer | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, alg: Alg, key_file: str, interval_s: float = 60.0) -> SignSettings:
        return cls(alg, key_file, interval_s, load_signer(alg, key_file))


def parse_sign(node: YMap) -> SignSettings | None:
    """`audit.sign: {alg, key_file, interval}`; a relative key_file is read from the
    config file's directory."""
    if node.get("sign") is None:
        return None
    sign = as_map(node.get("sign"), node, "sign")
    check_keys(sign, SIGN, "audit.sign")
    try:
        alg = Alg(sign.get("alg", "ed25519"))
    except ValueError:
        raise err("must be ed25519 or hmac-sha256", sign, "alg", "audit.sign") from None
    key_file = sign.get("key_file")
    if not isinstance(key_file, str) or not key_file:
        raise err("must be the path of the signing key (a file mounted from a secret)",
                  sign, "key_file" if "key_file" in sign else None, "audit.sign")
    if not Path(key_file).is_absolute() and sign.file:
        key_file = os.path.normpath(Path(sign.file).parent / key_file)
    interval = parse_duration(sign.get("interval", 60), lambda m: err(m, sign, "interval",
                                                                      "audit.sign"))
    try:
        return SignSettings.load(alg, key_file, interval)
    except KeyFileError as e:
        raise err(str(e), sign, "key_file", "audit.sign") from None

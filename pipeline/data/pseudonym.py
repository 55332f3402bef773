"""Keyed pseudonyms for user IDs (HMAC-SHA256), applied at ingest and by the served model.

With `ingest.pseudonymise_users: true` the ingest stage replaces every user ID by
`pseudonymise(ids, key)` right after reading the source, so no raw user ID reaches
data/, features, models, reports, MLflow or the registry. The served model takes the
raw ID of a request and pseudonymises it with the same key from the server's
environment.

A pseudonym is `pu-` + the first 32 hex characters (128 bits) of
HMAC-SHA256(key, str(user_id)): 128 bits keep collisions out of reach (about 1e-20
for a billion users) at half the width of the full digest, and the prefix marks a
pseudonymised user vocabulary unambiguously, so the served model knows it must
pseudonymise requests (a raw dataset of plain hex IDs is not mistaken for one).

The key comes only from the environment: `LEANREC_PSEUDONYM_KEY` (the key itself) or
`LEANREC_PSEUDONYM_KEY_FILE` (a file outside the project directory and the current
directory, so it cannot be committed or tracked with the data). It is never logged,
written, or taken from params.yaml; only the on/off switch lives there.

What it protects: the raw user IDs, in every artifact and in the registry. What it does
not: item histories can still identify a person (a few rare items are enough), whoever
holds the key can link pseudonyms back to raw IDs by hashing candidates, and item IDs are
not hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import ConfigError

KEY_ENV = "LEANREC_PSEUDONYM_KEY"
KEY_FILE_ENV = "LEANREC_PSEUDONYM_KEY_FILE"
PREFIX = "pu-"
HEX_CHARS = 32
PATTERN = f"{PREFIX}[0-9a-f]{{{HEX_CHARS}}}"  # a whole pseudonym, as a regular expression
MIN_KEY_BYTES = 16
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_CHECK_MESSAGE = b"leanrec pseudonym key check"


class PseudonymKeyError(ConfigError):
    """Pseudonymisation is on but no usable key is set (or the key does not match the model's)."""


def pseudonymise(ids: Iterable[object], key: bytes) -> list[str]:
    """Each ID (its str()) -> `pu-` + 32 hex characters of HMAC-SHA256(key, id). Deterministic for one key."""
    return [PREFIX + hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:HEX_CHARS] for value in ids]


def redact(texts: Iterable[str], key: bytes) -> list[str]:
    """Free text that may hold a raw user ID (a quarantined source line) -> `redacted:` + its keyed hash:
    equal lines stay equal, nothing of the text is kept (the line number still points into the source)."""
    return ["redacted:" + hmac.new(key, str(t).encode("utf-8"), hashlib.sha256).hexdigest()[:HEX_CHARS] for t in texts]


def is_pseudonym(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(PATTERN, value) is not None


def key_check(key: bytes) -> str:
    """A short public fingerprint of the key (an HMAC of a fixed message): tells two keys apart, reveals neither."""
    return hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:16]


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def load_key(environ: dict[str, str] | None = None, *, required: bool = True) -> bytes | None:
    """The key from LEANREC_PSEUDONYM_KEY or the file named by LEANREC_PSEUDONYM_KEY_FILE.

    Refuses a key file inside the project directory or the current directory, a key
    shorter than 16 bytes, and both variables at once. Without either variable: None, or
    PseudonymKeyError when `required`. Error messages never include the key."""
    env = os.environ if environ is None else environ
    value, file = env.get(KEY_ENV), env.get(KEY_FILE_ENV)
    if value and file:
        raise PseudonymKeyError(f"set {KEY_ENV} or {KEY_FILE_ENV}, not both")
    if file:
        path = Path(file).expanduser().resolve()
        for directory in (PROJECT_ROOT, Path.cwd().resolve()):
            if _inside(path, directory):
                raise PseudonymKeyError(f"{KEY_FILE_ENV} points inside {directory}: keep the key file outside the "
                                        "project and work directories, where it cannot be committed or tracked")
        try:
            key = path.read_bytes().strip()
        except OSError as err:
            raise PseudonymKeyError(f"{KEY_FILE_ENV}={path} cannot be read: {err.strerror}") from None
    elif value:
        key = value.encode("utf-8")
    elif required:
        raise PseudonymKeyError(f"user pseudonymisation needs a key: set {KEY_ENV} (the key) or {KEY_FILE_ENV} "
                                "(a file outside the project holding it)")
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"the pseudonym key is shorter than {MIN_KEY_BYTES} bytes: use a long random key "
                                "(e.g. `openssl rand -hex 32`)")
    return key

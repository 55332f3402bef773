"""Pseudonymised users in the served model: detecting them, recording the key's check value, the server's key.

A model registered from features whose user IDs are all pseudonyms
(pipeline/data/pseudonym.py, `ingest.pseudonymise_users`) knows its users only by
pseudonym, so the server hashes each request's raw user ID with the same key, read from
its own environment. The serving data records whether the users are pseudonymised and,
when the key was set at registration, its public check value (`privacy.json`), so a
server with another key refuses to load instead of treating every user as unknown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.data import pseudonym

PRIVACY_FILE = "privacy.json"  # pseudonymised_users, key_check


def users_pseudonymised(users: pa.Table) -> bool:
    """True when every known user ID is a pseudonym: requests must be hashed."""
    import pyarrow.compute as pc

    ids = users.column("id")
    return (users.num_rows > 0 and pa.types.is_string(ids.type)
            and bool(pc.all(pc.match_substring_regex(ids, f"^{pseudonym.PATTERN}$")).as_py()))


def write_privacy(users: pa.Table, data_dir: Path) -> None:
    """privacy.json in the serving data: whether the users are pseudonymised and the key's check value (if set)."""
    from pipeline.core.io import write_json

    pseudonymised = users_pseudonymised(users)
    key = pseudonym.load_key(required=False) if pseudonymised else None
    write_json({"pseudonymised_users": pseudonymised, "key_check": pseudonym.key_check(key) if key else None},
               data_dir / PRIVACY_FILE)


def server_key(pseudonymised: bool, data_dir: Path) -> bytes | None:
    """The key a model with pseudonymised users needs (from this server's environment), checked against the
    one it was registered with; None for a model with raw user IDs. Raises PseudonymKeyError."""
    if not pseudonymised:
        return None
    try:
        key = pseudonym.load_key()
    except pseudonym.PseudonymKeyError as err:
        raise pseudonym.PseudonymKeyError(f"this model's user IDs are pseudonymised, so the server needs the "
                                          f"same key: {err}") from None
    record = data_dir / PRIVACY_FILE
    expected = json.loads(record.read_text(encoding="utf-8")).get("key_check") if record.exists() else None
    if expected is not None and pseudonym.key_check(key) != expected:
        raise pseudonym.PseudonymKeyError("the server's pseudonym key is not the one this model's users were "
                                          "pseudonymised with: set the same LEANREC_PSEUDONYM_KEY(_FILE) as at ingest")
    return key

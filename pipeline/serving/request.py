"""Requests to the served model: one row validated by a pydantic model (`RequestRow`), the table by `parse_request`.

A request is a table (DataFrame, records or columns), one row per request, with `user_id` (a known
user) or `history` (a list of raw item IDs, oldest first), an optional `k`, an optional `diversity`
(the MMR re-ranking weight in [0, 1], pipeline/models/rerank.py; 0, the default, is off) and an optional
`explain` (true: add each item's supporting history items, pipeline/models/explain.py). A malformed one raises
`MlflowException` with INVALID_PARAMETER_VALUE (`mlflow models serve` answers HTTP 400 with the
message): an unknown column (a misspelt `K` included), a wrong type, `k` or `diversity` out of range, a history over
MAX_HISTORY items, more than MAX_ROWS rows or MAX_REQUEST_ITEMS history items in all. A message names
the row and quotes at most a short repr of the offending value (`shown`), never the whole of it.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

DEFAULT_K = 10
MAX_K = 1000  # k above min(MAX_K, catalogue size) is refused
MAX_ROWS = 10_000  # rows per request
# Items per history: longer ones are refused (HTTP 400); the model scores only the last `max_len` of a history.
MAX_HISTORY = 10_000
MAX_REQUEST_ITEMS = 1_000_000  # history items per request, every row together (bounds the work of one request)
MAX_ID_CHARS = 1000  # characters in a string user ID (it is echoed in the response)
SHOWN_CHARS = 40  # an error message quotes at most about this much of an offending value
COLUMNS = ("user_id", "history", "k", "diversity", "explain")

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = SHOWN_CHARS
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 5
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxlong = SHOWN_CHARS


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def shown(value: Any) -> str:
    """A short repr of a request value for an error message: at most 2 * SHOWN_CHARS characters and "..."."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 2 * SHOWN_CHARS else text[: 2 * SHOWN_CHARS] + "..."


def _shown_names(names: Sequence[Any]) -> str:
    listed = ", ".join(shown(name) for name in names[:5])
    return f"[{listed}{f', and {len(names) - 5} more' if len(names) > 5 else ''}]"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, list | tuple | dict | str | bytes | np.ndarray):  # never turned into an array here
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _native(value: Any) -> Any:
    """A pandas cell as plain Python: None when missing, numpy scalars and arrays unwrapped."""
    if _is_missing(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _integral(value: Any) -> Any:
    # An integer column with missing values arrives as float: 3.0 is 3 (and 2.5 stays 2.5, to be rejected).
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Catalogue:
    """What a request row is checked against: the served model's ID types and its largest k."""

    ids_are_int: bool
    user_ids_are_int: bool
    max_k: int
    pseudonymised_users: bool = False  # known users are pseudonyms: any raw ID (int or str) is hashed, not typed


class RequestRow(BaseModel):
    """One request row: a known `user_id` or a raw `history` (item IDs, oldest first), an optional `k` and an
    optional `diversity` (MMR weight in [0, 1]; 0: the model's own ranking).

    Validated with the served model's `Catalogue` as context (`model_validate(row, context=catalogue)`);
    every check raises a ValueError whose message names the problem and shows at most a short repr of
    the offending value. Unknown fields are rejected (`extra="forbid"`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    user_id: int | str | None = None
    history: list[int | str] | None = None
    k: int = DEFAULT_K
    diversity: float = 0.0
    explain: bool = False

    @field_validator("user_id", mode="before")
    @classmethod
    def _check_user_id(cls, value: Any, info: ValidationInfo) -> Any:
        value = _integral(_native(value))
        if value is None:
            return None
        if not (_is_int(value) or isinstance(value, str)):
            raise ValueError(f"user_id must be an integer or a string, got {shown(value)} ({type(value).__name__})")
        catalogue: Catalogue = info.context
        if not catalogue.pseudonymised_users and catalogue.user_ids_are_int != _is_int(value):
            kind = "integers" if catalogue.user_ids_are_int else "strings"
            raise ValueError(f"user IDs are {kind}, got {shown(value)} ({type(value).__name__})")
        if isinstance(value, str) and len(value) > MAX_ID_CHARS:
            raise ValueError(f"user_id has {len(value)} characters; at most {MAX_ID_CHARS} are accepted")
        return value

    @field_validator("history", mode="before")
    @classmethod
    def _check_history(cls, value: Any, info: ValidationInfo) -> Any:
        value = _native(value)
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValueError(f"history must be a list of item IDs, got {type(value).__name__}")
        if len(value) > MAX_HISTORY:
            raise ValueError(f"history holds {len(value)} items; at most {MAX_HISTORY} are accepted "
                             "(the model scores the most recent ones)")
        catalogue: Catalogue = info.context
        kind, fits = ("integers", _is_int) if catalogue.ids_are_int else ("strings", lambda v: isinstance(v, str))
        history = [item.item() if isinstance(item, np.generic) else item for item in value]
        bad = next((item for item in history if not fits(item)), _FITS)
        if bad is not _FITS:
            raise ValueError(f"history: item IDs are {kind}, got {shown(bad)} ({type(bad).__name__})")
        return history

    @field_validator("k", mode="before")
    @classmethod
    def _check_k(cls, value: Any, info: ValidationInfo) -> Any:
        value = _integral(_native(value))
        if value is None:
            return DEFAULT_K
        if not _is_int(value):
            raise ValueError(f"k must be an integer, got {shown(value)} ({type(value).__name__})")
        max_k = info.context.max_k
        if not 1 <= value <= max_k:
            raise ValueError(f"k must be between 1 and {max_k}, got {shown(value)}")
        return value

    @field_validator("diversity", mode="before")
    @classmethod
    def _check_diversity(cls, value: Any) -> Any:
        value = _native(value)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"diversity must be a number between 0 and 1 (the MMR weight; 0: off), got {shown(value)}")
        return float(value)

    @field_validator("explain", mode="before")
    @classmethod
    def _check_explain(cls, value: Any) -> Any:
        value = _native(value)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ValueError(f"explain must be true or false, got {shown(value)} ({type(value).__name__})")
        return value

    @model_validator(mode="after")
    def _one_of_user_or_history(self) -> RequestRow:
        if self.user_id is None and self.history is None:
            raise ValueError("give a user_id or a history")
        if self.user_id is not None and self.history is not None:
            raise ValueError("give a user_id or a history, not both")
        return self


_FITS = object()  # the marker of "every history item has the catalogue's ID type"


def _row_error(where: str, err: ValidationError) -> MlflowException:
    """The first problem of a row, as a 400 naming the row (never pydantic's echo of the input)."""
    first = err.errors(include_url=False, include_input=False)[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):
        message = str(cause)
    elif first["type"] == "extra_forbidden":
        message = f"unknown field {shown(first['loc'][-1])}; a request row has user_id or history, and optionally k, diversity and explain"
    else:  # a type the before-validators let through cannot reach here; kept readable all the same
        field = ".".join(str(part) for part in first["loc"])
        message = f"{field}: {first['msg']}" if field else first["msg"]
    return bad_request(f"{where}: {message}")


def _as_frame(request: Any) -> pd.DataFrame:
    if isinstance(request, pd.DataFrame):
        return request
    if isinstance(request, dict | list):  # columns {name: values} or records [{name: value}, ...]
        try:
            return pd.DataFrame(request)
        except (ValueError, TypeError) as err:
            raise bad_request(f"the request is not a table: {shown(str(err))}") from None
    raise bad_request(f"the request must be a table (DataFrame) with a user_id or history column, got {type(request).__name__}")


def parse_request(frame: Any, servable: Any) -> list[dict]:
    """Validate a request table: each row -> {user_id, history (raw), k, diversity, explain}. Raises bad_request (HTTP 400).

    `servable` is the served `pyfunc.Servable`: its ID types (`ids_are_int`, `user_ids_are_int`) and `n_items`.
    """
    frame = _as_frame(frame)
    unknown = [c for c in frame.columns if c not in COLUMNS]
    if unknown:
        raise bad_request(f"unknown column(s) {_shown_names(unknown)}; a request has user_id or history, "
                          "and optionally k, diversity and explain")
    if frame.columns.has_duplicates:
        raise bad_request("the request repeats a column")
    if "user_id" not in frame.columns and "history" not in frame.columns:
        raise bad_request("the request needs a user_id column (known users) or a history column (a list of item IDs)")
    if len(frame) == 0:
        raise bad_request("the request has no rows")
    if len(frame) > MAX_ROWS:
        raise bad_request(f"at most {MAX_ROWS} rows per request, got {len(frame)}")
    catalogue = Catalogue(servable.ids_are_int, servable.user_ids_are_int, min(MAX_K, servable.n_items),
                          getattr(servable, "pseudonymised", False))
    requests = []
    n_items = 0
    for position, row in enumerate(frame.to_dict("records")):
        where = f"row {position}"
        try:
            parsed = RequestRow.model_validate(row, context=catalogue)
        except ValidationError as err:
            raise _row_error(where, err) from None
        n_items += len(parsed.history or ())
        if n_items > MAX_REQUEST_ITEMS:
            raise bad_request(f"{where}: the request's histories hold more than {MAX_REQUEST_ITEMS} items in all; "
                              "split it into smaller requests")
        requests.append({"user_id": parsed.user_id, "history": parsed.history, "k": parsed.k,
                         "diversity": parsed.diversity, "explain": parsed.explain})
    return requests

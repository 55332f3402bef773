"""The expectation suite: every batch-level check and every row rule, each stated once, in GX.

A row rule is one GX expectation tied to one quarantine reason (`Check.reason`). GX runs with
result_format COMPLETE and lists the failing rows by `ROW_ID`, the named index of the frame it
validates (`frame.gx_frame`); `routing` builds the quarantine from those lists alone.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from pipeline.core import schema

logger = logging.getLogger(__name__)

DATA_DOCS_SITE = "leanrec_validate"
SUITE_TABLE = "raw_interactions"  # batch-level + not-null + uniqueness, on the whole frame
SUITE_RANGES = "raw_interactions_value_ranges"  # the range checks, on timestamp and rating only

# Named index of the frames GX validates: the row's position in the input table. GX reports a
# row rule's failing rows as values of it.
ROW_ID = "_leanrec_row"
# Helper column of the frame GX sees (never of an output): True where the (user, item,
# timestamp) hash occurs more than once among the rows whose three keys are all present.
KEY_HASH_REPEATED = "_leanrec_key_hash_repeated"

# Row-level reasons in priority order: a row is quarantined with the first rule it breaks.
NULL_USER = "null_user_id"
NULL_ITEM = "null_item_id"
NULL_TIMESTAMP = "null_timestamp"
TIMESTAMP_BEFORE_MIN = "timestamp_before_min"
TIMESTAMP_IN_FUTURE = "timestamp_in_future"
NULL_RATING = "null_rating"
RATING_OUT_OF_RANGE = "rating_out_of_range"
DUPLICATE = "duplicate"
REASONS = (
    NULL_USER,
    NULL_ITEM,
    NULL_TIMESTAMP,
    TIMESTAMP_BEFORE_MIN,
    TIMESTAMP_IN_FUTURE,
    NULL_RATING,
    RATING_OUT_OF_RANGE,
    DUPLICATE,
)

# pandas dtypes the type expectations accept; `frame.gx_frame` maps the Arrow types onto them.
ID_TYPES = ["Int64Dtype", "StringDtype"]  # Arrow int64 or string / large_string
TIMESTAMP_TYPE = "Timestamp"  # a tz-aware timestamp, any unit (an unambiguous instant); naive fails
RATING_TYPES = ["float32", "float64"]  # Arrow floating point (integers map to Int*Dtype and fail)
SOURCE_TYPES = ["StringDtype"]

# COMPLETE: every failing row, not a sample. The ids come from the named index (ROW_ID): GX reads
# them off the index in one pass, where an id *column* costs it a `DataFrame.at` per failing row.
# exclude_unexpected_values: the ids as one list ({ROW_ID: [...]}) instead of a dict per row
# holding the value too; return_unexpected_index_query: no pandas query string repeating them.
RESULT_FORMAT = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": [ROW_ID],
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
    "partial_unexpected_count": 5,
    "include_unexpected_rows": False,
}


@dataclass
class Check:
    """One GX expectation: its name in the report, its suite, the columns it needs, and for a row
    rule the quarantine reason of the rows it fails."""

    name: str
    suite: str
    expectation: Any
    columns: tuple[str, ...] = ()
    reason: str | None = None


@functools.cache
def gx() -> ModuleType:
    """Import GX lazily (about 5 s), with its analytics off before the first import."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # its INFO records are internals (docs registry...)
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context: analytics and progress bars off, at most one local docs site."""
    gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[DATA_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx().get_context(mode="ephemeral", project_config=config)


def checks(bounds: dict[str, Any], min_rows: int, present: set[str]) -> list[Check]:
    """The whole suite. Checks of a missing column other than its existence are left out: the
    batch fails on the missing column anyway, and they would only repeat 'column not found'."""
    from great_expectations.expectations.row_conditions import Column

    E = gx().expectations
    suite = [Check(f"column_exists:{c}", SUITE_TABLE, E.ExpectColumnToExist(column=c)) for c in schema.RAW_COLUMNS]
    types = {
        schema.USER: E.ExpectColumnValuesToBeInTypeList(column=schema.USER, type_list=ID_TYPES),
        schema.ITEM: E.ExpectColumnValuesToBeInTypeList(column=schema.ITEM, type_list=ID_TYPES),
        schema.TIMESTAMP: E.ExpectColumnValuesToBeOfType(column=schema.TIMESTAMP, type_=TIMESTAMP_TYPE),
        schema.RATING: E.ExpectColumnValuesToBeInTypeList(column=schema.RATING, type_list=RATING_TYPES),
        schema.SOURCE: E.ExpectColumnValuesToBeInTypeList(column=schema.SOURCE, type_list=SOURCE_TYPES),
    }
    suite += [Check(f"type:{c}", SUITE_TABLE, e, (c,)) for c, e in types.items()]
    suite.append(Check("min_rows", SUITE_TABLE, E.ExpectTableRowCountToBeBetween(min_value=min_rows)))

    def not_null(column: str, reason: str) -> Check:
        return Check(f"not_null:{column}", SUITE_TABLE, E.ExpectColumnValuesToNotBeNull(column=column), (column,), reason)

    # A between check judges non-null values only: a null is the not-null rule's to report.
    suite += [
        not_null(schema.USER, NULL_USER),
        not_null(schema.ITEM, NULL_ITEM),
        not_null(schema.TIMESTAMP, NULL_TIMESTAMP),
        not_null(schema.RATING, NULL_RATING),  # a NaN rating is null to GX too
        Check(
            "unique:user_id,item_id,timestamp",
            SUITE_TABLE,
            E.ExpectCompoundColumnsToBeUnique(
                column_list=list(schema.KEY_COLUMNS),
                ignore_row_if="any_value_is_missing",
                # A sound pre-filter (`frame.key_hash_repeated`): only these rows can be duplicates.
                row_condition=Column(KEY_HASH_REPEATED) == True,  # noqa: E712 (builds a GX condition)
            ),
            schema.KEY_COLUMNS,
            DUPLICATE,
        ),
        # The two timestamp bounds are two reasons, so two expectations: GX's verdict names the reason.
        Check(
            "min:timestamp",
            SUITE_RANGES,
            E.ExpectColumnValuesToBeBetween(column=schema.TIMESTAMP, min_value=bounds["min_timestamp"]),
            (schema.TIMESTAMP,),
            TIMESTAMP_BEFORE_MIN,
        ),
        Check(
            "max:timestamp",
            SUITE_RANGES,
            E.ExpectColumnValuesToBeBetween(column=schema.TIMESTAMP, max_value=bounds["max_timestamp"]),
            (schema.TIMESTAMP,),
            TIMESTAMP_IN_FUTURE,
        ),
        Check(
            "range:rating",
            SUITE_RANGES,
            E.ExpectColumnValuesToBeBetween(
                column=schema.RATING, min_value=bounds["rating_min"], max_value=bounds["rating_max"]
            ),
            (schema.RATING,),
            RATING_OUT_OF_RANGE,
        ),
    ]
    suite = [c for c in suite if set(c.columns) <= present]
    for check in suite:
        check.expectation.meta = {"check": check.name}
    return suite


@dataclass
class Batch:
    """One GX validation: the checks of one suite over one frame (pandas, or a Spark DataFrame)."""

    suite: str  # the GX suite's name
    checks: list[Check]
    frame: Any
    spark: bool = False
    result_format: dict[str, Any] | None = None  # RESULT_FORMAT when None


def run_gx(frames: dict[str, pd.DataFrame], suite: list[Check], docs_dir: Path | None) -> tuple[Any, list[Any]]:
    """Run one GX suite per pandas frame; returns the context (for Data Docs) and one result per check.

    GX fingerprints each batch with an MD5 over the whole frame (`pandas_data_fingerprint`, a
    batch marker nothing here reads); that cost is paid, see the package docstring.
    """
    return run_batches([Batch(name, [c for c in suite if c.suite == name], frame) for name, frame in frames.items()],
                       suite, docs_dir)


def run_batches(batches: list[Batch], suite: list[Check], docs_dir: Path | None) -> tuple[Any, list[Any]]:
    """Run each batch's checks as a GX suite on its frame; the context and one result per check of `suite`."""
    context = gx_context(docs_dir)
    sources: dict[bool, Any] = {}
    results: dict[int, Any] = {}
    for b in batches:
        if not b.checks:
            continue
        if b.spark not in sources:
            # persist=False: GX would cache the whole DataFrame and never release it.
            sources[b.spark] = (context.data_sources.add_spark("leanrec_spark", persist=False) if b.spark
                                else context.data_sources.add_pandas("leanrec"))
        batch = sources[b.spark].add_dataframe_asset(b.suite).add_batch_definition_whole_dataframe("whole_file")
        gx_suite = context.suites.add(gx().ExpectationSuite(name=b.suite, expectations=[c.expectation for c in b.checks]))
        definition = context.validation_definitions.add(gx().ValidationDefinition(name=b.suite, data=batch, suite=gx_suite))
        run = definition.run(batch_parameters={"dataframe": b.frame}, result_format=b.result_format or RESULT_FORMAT)
        # GX does not return results in suite order: match them back by expectation id.
        by_id = {r.expectation_config.id: r for r in run.results}
        for check, added in zip(b.checks, gx_suite.expectations, strict=True):
            results[id(check)] = by_id[added.id]
    return context, [results[id(c)] for c in suite]

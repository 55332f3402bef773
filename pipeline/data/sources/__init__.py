"""Where the ingest stage's interactions come from: each source yields tables in `schema.raw_schema`.

`synthetic` generates them; `movielens` (fetching archives through `download`) and
`files` (any CSV/Parquet) read them, on top of `text` (chunked delimited text, line
tracing), `convert` (`ReadResult`, rows to the raw schema, quarantine accounting)
and `parse` (typed column parsing). Nothing is re-exported here, so that importing
`synthetic` does not pull in the readers.
"""

"""Where the ingest stage's interactions come from: each source yields tables in `schema.raw_schema`."""

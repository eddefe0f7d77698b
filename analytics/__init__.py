"""Analytics: the event log exported to Parquet and queried with DuckDB."""

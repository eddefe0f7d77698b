"""Analytics: the event log exported to Parquet and queried with DuckDB.

``Exporter`` copies new stream messages into Parquet (idempotent, by stream sequence);
``connect(directory)`` opens DuckDB with the views ``runs``, ``steps``, ``events``,
``llm_calls``, ``tool_calls``, ``decisions``, ``costs``, ``external_events``, ``dead_letters``,
``commands``.
"""

from .export import Exporter, ExportResult
from .sql import VIEW_NAMES, connect, refresh

__all__ = ["VIEW_NAMES", "ExportResult", "Exporter", "connect", "refresh"]

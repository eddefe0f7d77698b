"""The original Polos's verbs, mapped onto ours (docs/migrating.md)."""

from __future__ import annotations

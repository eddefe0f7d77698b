"""The Polos web UI (``polos up`` serves it; ``polos ui`` against any server). See docs/ui.md."""

from __future__ import annotations

from .security import approval_url, approve_path
from .server import DEFAULT_PORT, UIConfig, UIServer

__all__ = ["DEFAULT_PORT", "UIConfig", "UIServer", "approval_url", "approve_path"]

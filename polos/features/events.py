"""``polos.events`` under the original's path (``from polos.features import events``)."""

from polos.events import *  # noqa: F403
from polos.events import __all__ as __all__

"""``polos.schedules`` under the original's path."""

from polos.schedules import *  # noqa: F403
from polos.schedules import __all__ as __all__

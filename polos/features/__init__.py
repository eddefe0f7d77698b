"""The original Polos's module paths: ``polos.features.events`` is ``polos.events``,
``polos.features.schedules`` is ``polos.schedules``."""

"""The scheduler service: owns time (durable sleeps, timeouts, retry back-offs, cron)."""

from .scheduler import Scheduler

__all__ = ["Scheduler"]

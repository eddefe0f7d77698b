"""The scheduler service: owns time (durable sleeps, timeouts, retry back-offs, cron)."""

from services.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]

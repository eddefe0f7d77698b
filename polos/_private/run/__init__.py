"""The run runtime: execution (replay, steps, fenced appends), in-run waits, wakes, timers."""

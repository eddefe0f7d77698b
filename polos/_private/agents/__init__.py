"""Agents: the loop and its steps, the provider call, prices, decision records, tools, memory."""

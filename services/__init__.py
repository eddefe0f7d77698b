"""Polos services: thin process mains over importable library code."""

"""The bottom layer's private part: value types and helpers every layer may use."""

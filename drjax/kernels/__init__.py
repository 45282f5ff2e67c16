"""Opt-in compute backends for specific hardware; the models run without them."""

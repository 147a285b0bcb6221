"""Adapters to peer libraries, one module per library (import each directly: its library is optional)."""

"""Echelon: boundary-first, auditable training across administrative boundaries."""

__version__ = "0.1.0"

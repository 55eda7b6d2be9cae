"""Drivers that run the sans-IO planes: `sim` (one process, virtual clock) and `grpc` (deployment)."""

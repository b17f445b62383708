"""Metrics with pinned semantics (dataset-level accumulation; averaging stated in each docstring)."""

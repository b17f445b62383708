"""Compatibility shims for third-party packages (see mmcv_ops)."""

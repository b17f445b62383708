"""Depth and segmentation metric tests (a package so that test basenames may repeat across folders)."""

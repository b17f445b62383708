"""Backbone tests (a package so that the LaSt-ViT loader tests can share the numpy pooling reference)."""

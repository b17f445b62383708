"""Cleaning methods: each is one registered :class:`~harness.methods.base.Method` subclass in one file that
declares what it touches (added tokens, layer hooks, the last block, a map after the final norm, a wrapper).
:class:`~harness.methods.base.DenseModel` runs a backbone with one method or a ``+`` composition."""

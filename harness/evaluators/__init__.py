"""evaluators package (entries are discovered by harness.registry)."""

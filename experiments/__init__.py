"""Experiments over the training application (scripts; a package so the tests can import them)."""

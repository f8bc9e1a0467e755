"""Prefect flows that read top to bottom, and the `vlmft` command line."""

"""Prefect tasks: thin wrappers over vlm_core (retries, logging, artifacts, the subprocess runner)."""

"""Deployment definitions: work pool, schedules, parameters from checked-in YAML."""

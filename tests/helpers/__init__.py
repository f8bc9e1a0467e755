"""Helpers that tests and tests/scripts import; the pytest fixtures stay in tests/conftest.py.

pytest puts tests/ on sys.path (rootdir-relative, no __init__.py in tests/), so tests import them as
`from helpers.images import jpeg_bytes`; a script under tests/scripts adds tests/ to sys.path itself.
"""

"""The `vlmft` command line: the entry point above every layer (vlmft → deployments → flows → tasks → vlm_core).

It lives in a package of its own so that no flow imports it: flows are imported by the command
line, by deployments and by Prefect workers, and must not depend on the thing that runs them.
"""

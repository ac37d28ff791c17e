"""Shared pytest setup: offline, quiet services, and the fixture plugins.

Fixture plugins (each owns one kind of real dependency):
- tests.fixtures.tiny      tiny random models + tokenizers for every registry family
- tests.fixtures.organism  the refusal model organism, trained once per session
- tests.fixtures.s3        a moto S3 server on loopback (or REFDIR_TEST_S3_ENDPOINT)
- tests.fixtures.services  the Prefect test API and a local Ray cluster
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytest_plugins = [
    "tests.fixtures.tiny",
    "tests.fixtures.organism",
    "tests.fixtures.s3",
    "tests.fixtures.services",
]

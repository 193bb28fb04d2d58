"""Shared test setup for ippo.train: the ``slow`` marker (run only with IPPO_SLOW=1)."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real 135M model; runs only with IPPO_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("IPPO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set IPPO_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

"""Fixtures for the Flower tests (they need the `flower` extra, which scripts/setup.sh installs)."""

import pytest


@pytest.fixture
def cfg_factory():
    """small_cfg(*overrides): the tiny config cut to three clients and two local steps."""
    from inprocess import small_cfg

    return small_cfg


@pytest.fixture
def grid_factory(tmp_path):
    """grid(node_configs): an InProcessGrid running fedmole's ClientApp, its nodes keeping their
    clients' state under the test's temporary folder."""
    from inprocess import InProcessGrid

    from fedmole.flower.client_app import app

    state = str(tmp_path / "node-state")
    return lambda node_configs: InProcessGrid(app, [{"state-dir": state, **nc} for nc in node_configs])

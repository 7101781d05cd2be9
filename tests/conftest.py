"""Session-wide test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _node_local_state_in_a_temporary_folder(tmp_path_factory):
    """Replay files (flwr_fedtan.node.weights) of every test go to pytest's temporary
    folder, not to the user's; subprocesses (Flower runs) inherit the variable."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDTAN_STATE_DIR", str(tmp_path_factory.mktemp("fedtan-state")))
    yield
    mp.undo()

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test gets the environment back as it found it.

    Training in-process (the demo, `structmar rl` through `main`) forms a world of one and sets RANK,
    WORLD_SIZE and MASTER_PORT for it, with that port held by this process's store; a later test's
    launcher subprocesses would inherit them and fail to bind the port.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cogvideo.environment import apply_defaults  # noqa: E402

apply_defaults()


@pytest.fixture
def one_thread():
    """Small ops: one intra-op thread (waking a pool costs more than the work, far more on a busy
    machine). A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

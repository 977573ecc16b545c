import os

import pytest
import torch
from hypothesis import settings

# Reproducible by default; DMQ_HYPOTHESIS=explore draws fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile("explore" if os.environ.get("DMQ_HYPOTHESIS") == "explore" else "ci")


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: thousands of tiny tensor ops gain nothing from threads, and contend on a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

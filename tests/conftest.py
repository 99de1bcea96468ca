import os

# The Triton kernels are tested on the CPU through Triton's interpreter (tests/test_kernels.py).
# Triton reads this when it is imported and when kernels are decorated, so it is set here, before
# any test module can import triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

# Two cores on CI: one intra-op thread per test process keeps timings sane and runs stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model directory in the official layout, written once per test session."""
    from light_tts.tools.make_random_model import make_random_model
    out = str(tmp_path_factory.mktemp("models") / "tiny")
    make_random_model(out, "tiny", seed=0, log=lambda *a, **k: None)
    return out


# Fixtures that start server or stage processes: a test that uses one is in the `server` tier
# (`pytest -m "not server"` is the fast tier), whether or not its module is marked as a whole.
PROCESS_FIXTURES = {"server", "decoder"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)

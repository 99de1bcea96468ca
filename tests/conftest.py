import os

# The Triton kernels are tested on the CPU through Triton's interpreter (tests/test_kernels.py).
# Triton reads this when it is imported and when kernels are decorated, so it is set here, before
# any test module can import triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

# In CI (CI set, as .ci/run does) a test that would skip because a tool CI installs is missing fails
from ci_tools import pytest_runtest_makereport  # noqa: E402,F401

# Two cores on CI: one intra-op thread per test process keeps timings sane and runs stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _write_tiny_model(tmp_path_factory, family: str) -> str:
    from light_tts.tools.make_random_model import make_random_model
    out = str(tmp_path_factory.mktemp(family) / "tiny")  # the server names its model by the basename
    make_random_model(out, "tiny", seed=0, log=lambda *a, **k: None, family=family)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random CosyVoice2 model directory in the official layout, written once per test session."""
    return _write_tiny_model(tmp_path_factory, "cosyvoice2")


@pytest.fixture(scope="session")
def tiny_cv3_model_dir(tmp_path_factory):
    """A tiny random CosyVoice3 model directory in the official layout, written once per test session."""
    return _write_tiny_model(tmp_path_factory, "cosyvoice3")


FAMILY_DIRS = {"cosyvoice2": "tiny_model_dir", "cosyvoice3": "tiny_cv3_model_dir"}


@pytest.fixture
def tiny_dir_of(request):
    """family name -> its tiny model directory (the session fixture above, written when first asked for)."""
    return lambda family: request.getfixturevalue(FAMILY_DIRS[family])


@pytest.fixture(params=sorted(FAMILY_DIRS))
def family_dir(request, tiny_dir_of):
    """(family, its tiny model directory): a test that takes it runs once per model family."""
    return request.param, tiny_dir_of(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module of tiny-tensor tests (thread hand-off costs more than it
    saves on the shared 2-core box); restored afterwards. Take it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Fixtures that start server or stage processes: a test that uses one is in the `server` tier
# (`pytest -m "not server"` is the fast tier), whether or not its module is marked as a whole.
PROCESS_FIXTURES = {"server", "decoder"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)

import json
import os
import sys

os.environ.setdefault("DGREF_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TEST_KERNEL = "dgref-test-python"


@pytest.fixture
def gen():
    """A fresh CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec whose argv is this interpreter (``sys.executable``), first on
    ``JUPYTER_PATH``, so that chapters run by the tests import what the tests import and no
    user-level ``python3`` kernelspec can hijack the run. Kernels inherit one torch thread and
    no progress bars."""
    base = tmp_path_factory.mktemp("jupyter")
    spec_dir = base / "kernels" / TEST_KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dgref tests", "language": "python"}))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(base)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]))
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    mp.setenv("DGREF_PROGRESS", "0")
    yield TEST_KERNEL
    mp.undo()


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` keep each test file on one worker (its
    module-scoped fixtures are built once), except tests that set their own ``xdist_group``
    (one group per chapter in test_chapters.py, so two chapters can run side by side)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))

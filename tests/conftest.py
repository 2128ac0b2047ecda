"""Shared test fixtures: repository paths, the CI params, the real MSRC data."""

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
MSRC = (REPO.parent / "shared" / "data" / "msrc-voc").resolve()

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under `pytest -n N` (pytest-xdist)
if WORKER:  # N test processes share the cores: one thread each, and one for what they start (kernels, CLIs)
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if WORKER else min(2, os.cpu_count() or 1))

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, what: str) -> None:
    """Skip a test whose requirement is missing, but fail it on CI (CI=true),
    where a missing data folder, peer or browser is a broken set-up."""
    if ok:
        return
    if ON_CI:
        pytest.fail(f"{what} (CI=true: a missing requirement fails the test instead of skipping it)")
    pytest.skip(what)


NOTEBOOKS_RUN: set[str] = set()  # notebooks this session executed without an error (papermill or JupyterLab)
# the tests that execute them; test_every_notebook_is_run_by_the_tests runs last and checks the set when they ran
NOTEBOOK_RUNNERS = ("test_pipeline_executes_every_notebook_with_ci_params", "test_the_compare_notebook_draws_the_same",
                    "test_cam_inspector_runs_and_responds_in_jupyterlab")


@pytest.fixture(autouse=True, scope="session")
def _notebook_runs_are_recorded():
    """Every notebook papermill executes in this process without an error goes into NOTEBOOKS_RUN."""
    import papermill

    real = papermill.execute_notebook

    def recording(input_path, output_path, *args, **kwargs):
        result = real(input_path, output_path, *args, **kwargs)
        NOTEBOOKS_RUN.add(Path(input_path).name)
        return result

    papermill.execute_notebook = recording
    yield
    papermill.execute_notebook = real


RUNNERS_PASSED: set[str] = set()


def pytest_runtest_logreport(report):
    """Which of the notebook-running tests passed (a skipped one, e.g. without a browser off CI, did not)."""
    name = report.nodeid.rsplit("::", 1)[-1]
    if report.when == "call" and report.passed and name in NOTEBOOK_RUNNERS:
        RUNNERS_PASSED.add(name)


NOT_RUN: list[str] = []  # under xdist, the controller's verdict: notebooks no worker executed
CHECKED: list[int] = []  # under xdist, how many notebooks the controller found executed, once it checked


def pytest_sessionfinish(session, exitstatus):
    """Under xdist the notebook runners run on several workers, so `test_every_notebook_is_run_by_the_tests`
    cannot see them all: each worker hands what it saw to the controller, which checks the union once every
    worker has ended and fails the session if a notebook went unexecuted."""
    if WORKER:
        if hasattr(session.config, "workeroutput"):
            session.config.workeroutput["notebooks_run"] = sorted(NOTEBOOKS_RUN)
            session.config.workeroutput["runners_passed"] = sorted(RUNNERS_PASSED)
    elif getattr(session.config.option, "numprocesses", None):
        from test_notebooks import notebooks_not_run

        NOT_RUN[:] = notebooks_not_run(NOTEBOOKS_RUN, RUNNERS_PASSED)
        if NOT_RUN:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        elif not set(NOTEBOOK_RUNNERS) - RUNNERS_PASSED:
            CHECKED.append(len(NOTEBOOKS_RUN))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller gathers every worker's executed notebooks and passed runners."""
    out = getattr(node, "workeroutput", {})
    NOTEBOOKS_RUN.update(out.get("notebooks_run", ()))
    RUNNERS_PASSED.update(out.get("runners_passed", ()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if NOT_RUN:
        terminalreporter.write_line(f"FAILED (conftest): notebooks no test executed: {', '.join(NOT_RUN)}",
                                    red=True)
    elif CHECKED:
        terminalreporter.write_line(f"every notebook was executed by the tests ({CHECKED[0]}, over every worker)")


def pytest_collection_modifyitems(session, config, items):
    """The check that every notebook ran comes after the tests that run them (under xdist the controller
    makes it instead, `pytest_sessionfinish`)."""
    last = [i for i in items if i.name == "test_every_notebook_is_run_by_the_tests"]
    items[:] = [i for i in items if i not in last] + ([] if WORKER else last)
    if WORKER and last:
        config.hook.pytest_deselected(items=last)


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """Generated datasets go to a per-session cache, not the user's home."""
    if "WSSS_CACHE" not in os.environ:
        os.environ["WSSS_CACHE"] = str(tmp_path_factory.mktemp("wsss-cache"))
    yield


@pytest.fixture
def ci_config():
    return REPO / "params" / "ci.yaml"


@pytest.fixture
def msrc_root():
    require(MSRC.is_dir(), f"real data not found at {MSRC} (the repository must sit next to shared/)")
    return MSRC


@pytest.fixture
def grad_cam_peer():
    """pytorch-grad-cam, the test-only peer of our CAMs."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        require(False, "pytorch-grad-cam (grad-cam) is not installed")


FIRST_HALF = ("data", "classifier", "label_filter", "cams", "crf")


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """(folder, build): a folder of this session that the caller fills when `build`. Under xdist every worker
    gets the same folder: the first to ask builds it while the others wait, and then find it built (no
    work done twice, and no worker runs stages in a folder another reads)."""
    if not WORKER:
        yield tmp_path_factory.mktemp(name), True
        return
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{shared}.lock"):
        done = shared / ".built"
        build = not done.exists()
        shared.mkdir(exist_ok=True)
        yield shared, build
        done.touch()


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory, _cache_in_tmp):
    """A CI-sized run with data, classifier, label filter, CAMs and CRF done."""
    from wsss_core import stages
    from wsss_core.config import load_config

    cfg = load_config(REPO / "params" / "ci.yaml")
    with built_once(tmp_path_factory, "ci-run") as (root, build):
        run = stages.open_run(root, cfg)
        for name in FIRST_HALF if build else ():
            stages.run_stage(name, cfg, run)
    return cfg, run


@pytest.fixture(scope="session")
def ci_full_run(ci_run, tmp_path_factory):
    """A copy of `ci_run` with every stage done (boundary .. report)."""
    import shutil

    from wsss_core import stages

    cfg, first = ci_run
    with built_once(tmp_path_factory, "ci-full") as (folder, build):
        root = folder / "run"
        if build:
            shutil.copytree(first.root, root)
        run = stages.open_run(root, cfg)
        for name in stages.pipeline_order() if build else ():
            stages.run_stage(name, cfg, run)
    return cfg, run

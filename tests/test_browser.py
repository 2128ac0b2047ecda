"""The notebooks in a real JupyterLab, driven in headless Chromium.

One JupyterLab server (on a port the OS picks) serves copies of
`cam_inspector.ipynb` and `02_cams.ipynb` whose parameters point at the
finished CI run; one Chromium (Debian's, through Playwright; nothing downloads
a browser) opens each, runs all cells from the Run menu and checks that every
cell ran without a traceback and that pictures render. The CAM inspector must
also open on the run's own settings and redraw when its slider and class
dropdown move.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from conftest import NOTEBOOKS_RUN, REPO, require

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, which a
# closed network refuses; the others keep a root, GPU-less container happy.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-extensions"]
NOTEBOOKS = ("cam_inspector.ipynb", "02_cams.ipynb")

# JupyterLab settings for the test user: every cell attached to the DOM (no
# virtual scrolling) and no news / update pop-ups over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen
STATUS = "(document.querySelector('#jp-main-statusbar')?.innerText || '')"
# the status bar reads "Python 3 (ipykernel) | Idle" once a kernel is connected and idle
KERNEL_IDLE = f"() => /\\| Idle/.test({STATUS}) && !/No Kernel/.test({STATUS})"
# Run All is over: kernel idle, no cell queued or running ([*]), the first one numbered
# (an error stops Run All: the cells after it fall back to [ ] and are reported below)
RUN_FINISHED = f"""() => {{
  const prompts = [...document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputPrompt')].map(e => e.innerText.trim());
  return /\\| Idle/.test({STATUS}) && prompts.length > 0 && !prompts.some(p => p.includes('*')) && /\\d/.test(prompts[0]);
}}"""
# JupyterLab 4 renders an error output like stderr (data-mime-type
# application/vnd.jupyter.stderr), with IPython's traceback header in it
STDERR = ('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
          '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
INSPECTOR_IMG = f"{PANEL} .widget-vbox .widget-output img"
IMG_CHANGED = "([sel, old]) => { const i = document.querySelector(sel); return !!i && i.complete && i.src !== old; }"


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT/
    token: str
    root: Path  # the server's root_dir, holding the edited notebooks
    best_threshold: float
    cfg: object

    def address(self, notebook: str) -> str:
        # ?reset: a fresh workspace, only this notebook open
        return f"{self.url}lab/tree/{notebook}?reset&token={self.token}"


def with_parameters(src: Path, dst: Path, **values: str) -> None:
    """Copy a notebook, setting `name = value` lines of its `parameters` cell."""
    nb = nbformat.read(src, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name, value in values.items():
        cell.source, n = re.subn(rf"^{name}\s*=.*$", f"{name} = {value!r}", cell.source, flags=re.M)
        assert n == 1, f"{src.name}: no `{name} =` line in the parameters cell"
    nbformat.write(nb, dst)


def descendants(pid: int) -> list[int]:
    """Ids of the processes below `pid` (kernels run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_lab(root: Path, home: Path, token: str, env: dict, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start JupyterLab on a port the OS picks; wait until it answers. The
    server binds port 0 itself; should the port be taken between its probe and
    its listen, it exits and we start it again."""
    log = home / "lab.log"
    for attempt in range(attempts):
        runtime = home / f"runtime-{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             "--ServerApp.port=0", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--LabApp.extension_manager=readonly"],
            env={**env, "JUPYTER_RUNTIME_DIR": str(runtime)}, cwd=root, stdin=subprocess.DEVNULL,
            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        info_file = runtime / f"jpserver-{proc.pid}.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if info_file.is_file():
                try:
                    url = json.loads(info_file.read_text())["url"]
                    with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=5) as r:
                        if r.status == 200:
                            return proc, url
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.2)
        stop_lab(proc, None, token)
    raise RuntimeError(f"JupyterLab did not start ({attempts} attempts); its log: {log}\n"
                       + log.read_text()[-3000:])


def stop_lab(proc: subprocess.Popen, url: str | None, token: str) -> None:
    """Shut the server and its kernels down; kill what is left, by id."""
    below = descendants(proc.pid)
    if url and proc.poll() is None:
        try:  # a clean shutdown also shuts the kernels down
            req = urllib.request.Request(f"{url}api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright (never a downloaded browser)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (it is in the dev extra: pip install -e .[dev])")
    require(CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK),
            f"{CHROMIUM} not found (apt-get install chromium)")
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # expect() waits for the page this long (default 5 s)
    pw = sync_playwright().start()
    b = None
    try:
        try:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                                   timeout=60_000)
        except PlaywrightError as e:
            require(False, f"{CHROMIUM} cannot start: {str(e).splitlines()[0]}")
        yield b
    finally:
        if b is not None:
            b.close()
        pw.stop()


@pytest.fixture(scope="module")
def lab(browser, request, tmp_path_factory):
    """JupyterLab serving the two notebooks, parameterised for the finished CI run."""
    cfg, run = request.getfixturevalue("ci_run")  # after the browser check: no run built to be skipped
    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    root.mkdir()
    for name in NOTEBOOKS:
        with_parameters(REPO / "notebooks" / name, root / name,
                        config=str(REPO / "params" / "ci.yaml"), run_dir=str(Path(run.root).resolve()))
    settings = home / "settings"
    for rel, values in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(values))
    env = {**os.environ,  # WSSS_CACHE included: the kernels find the session's synthetic data
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "PYTHONUNBUFFERED": "1"}
    token = secrets.token_hex(16)
    proc, url = start_lab(root, home, token, env)
    try:
        best = run.manifest("cams")["metrics"]["best_threshold"]
        yield Lab(url, token, root, float(best), cfg)
    finally:
        stop_lab(proc, url, token)


@pytest.fixture
def page(browser, lab, request):
    """A fresh browser context and page; a screenshot is kept when the test fails."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    failed_before = request.session.testsfailed
    pg = context.new_page()
    yield pg
    try:
        if request.session.testsfailed > failed_before:  # the call phase is reported before teardown
            shot = lab.root.parent / f"{request.node.name}.png"
            pg.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the failing page: {shot}")
    except Exception:  # noqa: BLE001 - a screenshot is a courtesy
        pass
    finally:
        context.close()


def run_all_cells(page, lab: Lab, notebook: str, timeout_s: float = 240) -> None:
    """Open `notebook` in JupyterLab, run Run > Run All Cells, wait until it
    finished, and assert every code cell ran and none shows a traceback."""
    page.goto(lab.address(notebook))
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)  # Run All is ignored before a kernel is connected
    page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
    page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")').click()
    page.wait_for_function(RUN_FINISHED, timeout=timeout_s * 1000, polling=250)
    assert_no_traceback(page, notebook)
    prompts = [p.strip() for p in page.locator(f"{PANEL} .jp-CodeCell .jp-InputPrompt").all_inner_texts()]
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), f"{notebook}: cells not run: {prompts}"
    NOTEBOOKS_RUN.add(notebook)


def assert_no_traceback(page, notebook: str) -> None:
    errors = [t for t in page.locator(f"{PANEL} :is({STDERR})").all_inner_texts()
              if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b.*:", t, re.M)]
    assert not errors, f"{notebook}: error output in JupyterLab:\n" + "\n\n".join(errors)[-4000:]


def pixels(src: str) -> np.ndarray:
    """The decoded pixels of a data: URL PNG."""
    assert src and src.startswith("data:image/png;base64,"), (src or "")[:80]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or bool((a != b).any())


def next_picture(page, old: str, what: str, timeout_s: float = 30) -> str:
    """Wait until the inspector shows another picture than `old`; return it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(IMG_CHANGED, arg=[INSPECTOR_IMG, old], timeout=timeout_s * 1000, polling=100)
    except PlaywrightTimeout:
        pytest.fail(f"the inspector's picture did not change within {timeout_s:.0f} s after {what}")
    page.wait_for_function(KERNEL_IDLE)  # the redraw is over: nothing else is pending
    return page.locator(INSPECTOR_IMG).get_attribute("src")


def test_cam_inspector_runs_and_responds_in_jupyterlab(page, lab):
    from playwright.sync_api import expect

    run_all_cells(page, lab, "cam_inspector.ipynb")
    panel = page.locator(f"{PANEL} .widget-vbox").first
    # widget views render after their cell's output arrives: expect() waits for them
    for name in ("image", "class", "scales"):
        expect(panel.locator(".widget-dropdown", has_text=name).locator("select")).to_be_visible()
    slider = panel.locator(".widget-slider", has_text="bg thresh")
    handle = slider.locator(".noUi-handle")
    expect(handle).to_be_visible()
    expect(panel.locator(".widget-slider", has_text="alpha").locator(".noUi-handle")).to_be_visible()
    expect(panel.locator(".widget-toggle-buttons button")).to_have_text(
        ["Grad-CAM", "Grad-CAM++", "Grad-CAM++ (seed)"])  # every CAM method the stage has

    # it opens on the run's own CAM settings
    cams = lab.cfg.cams
    scales = panel.locator(".widget-dropdown", has_text="scales").locator("select")
    expect(scales).to_have_value(", ".join(map(str, cams.scales)) + " (this run)")
    expect(panel.locator(".widget-toggle-buttons button.mod-active")).to_have_text(
        {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "gradcam++exp": "Grad-CAM++ (seed)"}[cams.method])
    readout = slider.locator(".widget-readout")
    expect(readout).to_have_text(f"{lab.best_threshold:.2f}")

    img = page.locator(INSPECTOR_IMG)
    expect(img).to_have_count(1)
    expect(img).to_be_visible()
    page.wait_for_function(KERNEL_IDLE)
    first = img.get_attribute("src")

    # move the background-threshold slider from the keyboard: End = 1.0, all background
    handle.focus()
    handle.press("End")
    expect(readout).to_have_text("1.00")
    moved = next_picture(page, first, "moving the bg thresh slider")
    assert differs(pixels(first), pixels(moved))

    # another class
    cls = panel.locator(".widget-dropdown", has_text="class").locator("select")
    options = cls.evaluate("s => [...s.options].map(o => o.value)")
    other = next(o for o in options if o != cls.input_value())
    cls.select_option(other)
    switched = next_picture(page, moved, f"choosing the class {other!r}")
    assert differs(pixels(moved), pixels(switched))
    assert_no_traceback(page, "cam_inspector.ipynb")  # the callbacks draw into the widget's Output


def test_02_cams_runs_and_draws_in_jupyterlab(page, lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    run_all_cells(page, lab, "02_cams.ipynb")
    images = page.locator(f"{PANEL} .jp-OutputArea-output img")
    expect(images.first).to_be_visible()  # at least one picture
    try:
        page.wait_for_function("sel => [...document.querySelectorAll(sel)].every(i => i.complete)",
                               arg=f"{PANEL} .jp-OutputArea-output img")
    except PlaywrightTimeout:
        pass  # reported below
    sizes = images.evaluate_all("imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert all(ok and w > 0 and h > 0 for ok, w, h in sizes), sizes
    text = "\n".join(page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts())
    assert re.search(r"CAM mIoU [\d.]+ at background threshold", text), text[-2000:]

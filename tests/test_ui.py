"""The widgets in a real JupyterLab, in a real browser (Debian's Chromium driven by Playwright).

Starts a JupyterLab server on 127.0.0.1 with a token in a temporary root, opens each widget notebook,
runs all cells, and checks in the page that the widgets rendered, that a slider move redraws them, and
that no cell raised. Screenshots go to tests/screenshots/ (or $BRATS_NB_SCREENSHOTS)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("BRATS_NB_SCREENSHOTS", REPO / "tests" / "screenshots"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (tests/install_browser.sh)")
playwright = pytest.importorskip("playwright.sync_api")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("labroot")
    cfg = tmp_path_factory.mktemp("labcfg")
    settings = cfg / "user-settings"
    for ext, name, body in [("@jupyterlab/apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False}),
                            ("@jupyterlab/notebook-extension", "tracker", {"windowingMode": "none"})]:
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(body))
    # the notebooks refer to ../data_samples and ../../shared: keep that layout inside the server's root
    (root / "nbs").mkdir()
    for nb in (REPO / "nbs").glob("*.ipynb"): shutil.copy(nb, root / "nbs" / nb.name)
    os.symlink(REPO / "data_samples", root / "data_samples")
    token, port = "brats-nb-test-token", _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg / "config"), JUPYTER_DATA_DIR=str(cfg / "data"),
               JUPYTER_RUNTIME_DIR=str(cfg / "runtime"), IPYTHONDIR=str(cfg / "ipython"), MPLCONFIGDIR=str(cfg / "mpl"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), MPLBACKEND="module://matplotlib_inline.backend_inline")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0: cmd.append("--allow-root")
    log = open(cfg / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2); break
            except Exception:
                if proc.poll() is not None: break
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start:\n" + (cfg / "server.log").read_text()[-3000:])
        if proc.poll() is not None: pytest.fail("JupyterLab exited:\n" + (cfg / "server.log").read_text()[-3000:])
        yield url, token
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
            try: proc.wait(timeout=8); break
            except subprocess.TimeoutExpired: continue
        log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS[1:], headless=True)
        yield b
        b.close()


def run_notebook(browser, lab, name, timeout_s=240):
    "Open nbs/<name> in JupyterLab, run all cells, wait for idle; returns the page."
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(timeout_s * 1000)
    page.goto(f"{url}/lab/tree/nbs/{name}?token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext", polling=500)
    page.wait_for_function("""() => { const s = window.jupyterapp.shell.currentWidget.sessionContext;
                               return s.isReady && s.session && s.session.kernel && s.session.kernel.status === 'idle'; }""", polling=500)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    wait_idle(page)
    return page


def wait_idle(page, quiet_ms=1500):
    "Wait until the kernel has stayed idle for `quiet_ms`."
    page.wait_for_function(f"""() => {{
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const busy = document.querySelectorAll('.jp-InputArea-prompt').length && Array.from(document.querySelectorAll('.jp-InputArea-prompt')).some(e => e.textContent.includes('*'));
        const now = Date.now();
        if (k.status !== 'idle' || busy) {{ window.__idleSince = undefined; return false; }}
        if (window.__idleSince === undefined) window.__idleSince = now;
        return now - window.__idleSince > {quiet_ms};
    }}""", polling=250)


def assert_no_errors(page, name):
    errors = page.locator('.jp-OutputArea-output[data-mime-type*="error"]')
    if errors.count():
        pytest.fail(f"{name}: a cell raised:\n" + errors.first.inner_text()[:3000])


def shot(page, locator, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(SHOTS / name))
    assert (SHOTS / name).stat().st_size > 1000


def move_slider(page, slider, presses=3):
    "Focus a slider's handle and press ArrowRight; returns (readout before, after)."
    readout = slider.locator(".widget-readout")
    before = readout.inner_text()
    handle = slider.locator(".noUi-handle")
    handle.scroll_into_view_if_needed(); handle.focus()
    for _ in range(presses): page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, b]) => el.textContent.trim() !== b.trim()", arg=[readout.element_handle(), before])
    wait_idle(page)
    return before, readout.inner_text()


def image_src(img):
    return img.evaluate("e => e.src")


def test_slice_viewer_in_jupyterlab(lab, browser):
    page = run_notebook(browser, lab, "00_data.ipynb")
    try:
        assert_no_errors(page, "00_data")
        viewer = page.locator(".widget-vbox").filter(has=page.locator(".widget-slider")).filter(has=page.locator("img")).first
        viewer.wait_for()
        img = viewer.locator("img").first
        assert img.evaluate("e => e.complete && e.naturalWidth > 0")
        shot(page, viewer, "slice_viewer.png")
        src = image_src(img)
        before, after = move_slider(page, viewer.locator(".widget-slider").first)
        assert int(after) > int(before)
        page.wait_for_function("([e, s]) => e.src !== s", arg=[img.element_handle(), src])
        assert img.evaluate("e => e.complete && e.naturalWidth > 0")
        shot(page, viewer, "slice_viewer_moved.png")
    finally:
        page.close()

"""The widgets in a real JupyterLab, in a real browser (Debian's Chromium driven by Playwright).

Starts a JupyterLab server on 127.0.0.1 with a token in a temporary root, opens each widget notebook,
runs all cells, and checks in the page that the widgets rendered, that a slider move redraws them, and
that no cell raised. Screenshots go to tests/screenshots/ (or $BRATS_NB_SCREENSHOTS)."""
import contextlib
import json
import os
import re
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


def _flagged(cell):
    "True for a cell that nbdev_test skips here: a `#| slow` or `#| cuda` directive."
    src = cell.get("source", "")
    lines = src.splitlines() if isinstance(src, str) else "".join(src).splitlines()
    return cell.get("cell_type") == "code" and any(l.strip().replace(" ", "") in ("#|slow", "#|cuda") for l in lines)


def lab_copy(src, dst):
    "Copy a notebook without its slow and GPU cells, as nbdev_test runs it on this CPU machine."
    nb = json.loads(Path(src).read_text())
    nb["cells"] = [c for c in nb["cells"] if not _flagged(c)]
    Path(dst).write_text(json.dumps(nb))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("labroot")
    cfg = tmp_path_factory.mktemp("labcfg")
    settings = cfg / "user-settings"
    for ext, name, body in [("@jupyterlab/apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False}),
                            ("@jupyterlab/notebook-extension", "tracker", {"windowingMode": "none"})]:
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(body))
    # the notebooks refer to ../data_samples, results/ and ../../shared: keep that layout inside the server's root
    (root / "nbs").mkdir()
    for nb in (REPO / "nbs").glob("*.ipynb"): lab_copy(nb, root / "nbs" / nb.name)
    os.symlink(REPO / "data_samples", root / "data_samples")
    os.symlink(REPO / "nbs" / "results", root / "nbs" / "results")   # the recorded results some notebooks read
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
        try:
            kernels = json.load(urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=5))
            for k in kernels:
                req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10)
        except Exception:
            pass  # the server is already gone; the sweep below still finds its kernels
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
            try: proc.wait(timeout=8); break
            except subprocess.TimeoutExpired: continue
        log.close()
        runtime = str(cfg / "runtime")   # any kernel of this server still alive: its command line names our runtime dir
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try: cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
            except OSError: continue
            if runtime in cmdline and "ipykernel" in cmdline:
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass


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
    # a workspace of its own, reset: else Lab restores the notebooks that earlier tests opened, beside this one
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/nbs/{name}?reset&token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext", polling=500)
    page.wait_for_function("""() => { const s = window.jupyterapp.shell.currentWidget.sessionContext;
                               return s.isReady && s.session && s.session.kernel && s.session.kernel.status === 'idle'; }""", polling=500)
    page.evaluate("""(ms) => Promise.race([window.jupyterapp.commands.execute('notebook:run-all-cells'),
                       new Promise((_, fail) => setTimeout(() => fail(new Error('run-all-cells did not return')), ms))])""",
                  timeout_s * 1000)
    wait_idle(page)
    return page


def wait_idle(page, quiet_ms=1500):
    "Wait until the kernel has stayed idle for `quiet_ms`, counted from this call (a click's message may not have reached the kernel yet)."
    page.evaluate("() => { window.__idleSince = undefined; }")
    page.wait_for_function(f"""() => {{
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const prompts = window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-InputArea-prompt');
        const busy = Array.from(prompts).some(e => e.textContent.includes('*'));
        const now = Date.now();
        if (k.status !== 'idle' || busy) {{ window.__idleSince = undefined; return false; }}
        if (window.__idleSince === undefined) window.__idleSince = now;
        return now - window.__idleSince > {quiet_ms};
    }}""", polling=250)


def assert_no_errors(page, name):
    errors = page.locator('.jp-OutputArea-output[data-mime-type*="error"]')
    if errors.count():
        pytest.fail(f"{name}: a cell raised:\n" + errors.first.inner_text()[:3000])


@contextlib.contextmanager
def notebook_page(browser, lab, name, timeout_s=240):
    "A page on nbs/<name> with every cell run and none raising; closed on the way out."
    page = run_notebook(browser, lab, name, timeout_s)
    try:
        assert_no_errors(page, Path(name).stem)
        yield page
    finally:
        page.close()


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
    with notebook_page(browser, lab, "00_data.ipynb") as page:
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


def kernel_exec(page, code):
    "Run `code` in the notebook's kernel (as a cell would) and return the reply's status."
    return page.evaluate("""async (code) => {
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const reply = await k.requestExecute({code}).done;
        return reply.content.status; }""", code)


def widget_box(page, *, text=None, has=()):
    "The outermost ipywidgets VBox that contains every selector in `has` (and `text`, if given)."
    box = page.locator(".widget-vbox")
    for sel in has: box = box.filter(has=page.locator(sel))
    if text: box = box.filter(has_text=text)
    box = box.first
    try:
        box.wait_for()
    except Exception:
        outs = page.locator(".jp-OutputArea-output").all_text_contents()
        pytest.fail("widget not found; outputs that mention widgets or errors:\n" +
                    "\n".join(o[:300] for o in outs if "idget" in o or "rror" in o)[:3000])
    return box


def slider_named(box, label):
    "The slider whose label is exactly `label`."
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return box.locator(".widget-slider").filter(has=box.page.locator(".widget-label", has_text=exact)).first


def loaded(img):
    return img.evaluate("e => e.complete && e.naturalWidth > 0")


def slide_and_redraw(page, viewer, label="slice", shot_name=None, presses=3):
    "Move the slider `label` of `viewer` and wait until its first image is redrawn; returns the readouts (before, after)."
    img = viewer.locator("img").first
    src = image_src(img)
    before, after = move_slider(page, slider_named(viewer, label), presses)
    assert int(after) == int(before) + presses
    page.wait_for_function("([e, s]) => e.src !== s", arg=[img.element_handle(), src])
    assert loaded(img)
    if shot_name: shot(page, viewer, shot_name)
    return before, after


def test_attention_viewer_in_jupyterlab(lab, browser):
    with notebook_page(browser, lab, "02_mie.ipynb") as page:
        viewer = widget_box(page, text="stretch colours", has=(".widget-slider", "img"))
        img = viewer.locator("img").first
        assert loaded(img)
        # the channel-weight bars: one row per modality
        for m in ("t1", "t1ce", "t2", "flair"): assert m in viewer.inner_text()
        shot(page, viewer, "attention_viewer.png")
        _, after = slide_and_redraw(page, viewer)
        assert f"{after}/" in viewer.inner_text()          # the caption follows the slider
        shot(page, viewer, "attention_viewer_moved.png")


def test_keypoint_viewer_in_jupyterlab(lab, browser):
    with notebook_page(browser, lab, "05_keypoints.ipynb") as page:
        viewer = widget_box(page, has=(".js-plotly-plot", ".widget-slider", "img"))
        plots = viewer.locator(".js-plotly-plot")
        assert plots.count() == 2                           # the 3D view and the IoU curve
        scene = plots.nth(0)
        scene.locator(".gl-container canvas, canvas").first.wait_for()   # the 3D scene drew through WebGL
        assert "WebGL is not supported" not in scene.text_content()
        title = scene.locator(".gtitle")
        page.wait_for_function("e => /key points, best hull IoU/.test(e.textContent)", arg=title.element_handle())
        curve_points = plots.nth(1).locator(".scatterlayer .trace").first.locator(".points path")
        assert curve_points.count() >= 1                   # one dot per candidate hull
        img = viewer.locator("img").first
        assert loaded(img)
        shot(page, viewer, "keypoint_viewer.png")
        # fewer points: the selection reruns, the 3D title and the IoU line change
        t_before = title.text_content()
        before, after = move_slider(page, slider_named(viewer, "n"), presses=5)
        assert int(after) == int(before) + 5
        page.wait_for_function("([e, b]) => e.textContent !== b", arg=[title.element_handle(), t_before])
        assert title.text_content().split(":")[1].strip().startswith(f"{after} key points")
        # the slice slider redraws the 2D map
        slide_and_redraw(page, viewer, shot_name="keypoint_viewer_moved.png")


def test_prediction_viewer_in_jupyterlab(lab, browser):
    with notebook_page(browser, lab, "08_inference.ipynb") as page:
        viewer = widget_box(page, has=(".widget-slider", "img", "button:has-text('worst slice')"))
        img = viewer.locator("img").first
        assert loaded(img)
        assert "Dice" in viewer.inner_text() and "FP" in viewer.inner_text()
        readout = slider_named(viewer, "slice").locator(".widget-readout")
        worst = viewer.locator("button:has-text('worst slice')")
        worst.click(); wait_idle(page)
        at_worst = readout.inner_text().strip()            # the slice with the most FP + FN voxels
        shot(page, viewer, "prediction_viewer.png")
        before, _ = slide_and_redraw(page, viewer, shot_name="prediction_viewer_moved.png")
        assert before.strip() == at_worst
        worst.click()                                      # and back
        page.wait_for_function("([e, b]) => e.textContent.trim() === b", arg=[readout.element_handle(), at_worst])


def test_training_curves_in_jupyterlab(lab, browser):
    with notebook_page(browser, lab, "09_trainer.ipynb", timeout_s=400) as page:
        fig = page.locator(".js-plotly-plot").filter(has_text="validation Dice").first
        fig.wait_for()
        loss = fig.locator(".scatterlayer .trace").first.locator(".points path")
        page.wait_for_function("e => e.querySelectorAll('.scatterlayer .trace')[0].querySelectorAll('.points path').length === 3",
                               arg=fig.element_handle())
        assert fig.locator(".legendtext", has_text="Dice WT").count() == 1
        shot(page, fig, "training_curves.png")
        # what train(callbacks=[w.add_row]) does after an epoch: the kernel appends a row, the page redraws
        assert kernel_exec(page, "w.add_row(dict(epoch=4, loss=0.5, gdl=0.5, bsc=0.0, val_WT=0.6, val_TC=0.5, val_ET=0.4, val_mean=0.5))") == "ok"
        page.wait_for_function("e => e.querySelectorAll('.scatterlayer .trace')[0].querySelectorAll('.points path').length === 4",
                               arg=fig.element_handle())
        assert loss.count() == 4
        wait_idle(page)
        shot(page, fig, "training_curves_updated.png")

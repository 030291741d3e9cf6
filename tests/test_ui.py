"""Every notebook, and its widgets, in a real JupyterLab in a real browser (Debian's Chromium driven by Playwright).

Starts a JupyterLab server on 127.0.0.1 with a token in a temporary root holding the notebooks as they are (slow and
GPU cells included: their guards skip them with a line, as on a student's laptop). Each notebook is opened and run
with *Run All*, once: the widget notebooks by the tests that then check their widgets (rendered, a slider move
redraws them), the others by `test_notebook_runs_clean_in_jupyterlab`. Every run must finish within
MAX_RUN_ALL_S, with every code cell executed and no error output, both read from the notebook's model (not the DOM).
Screenshots go to tests/screenshots/ (or $BRATS_NB_SCREENSHOTS), run times to run_all_times.json beside them."""
import contextlib
import io
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


MAX_RUN_ALL_S = 90          # a student's Run All of one notebook on a 2-core laptop
WIDGET_NOTEBOOKS = {"00_data.ipynb", "02_mie.ipynb", "05_keypoints.ipynb", "08_inference.ipynb", "09_trainer.ipynb"}
ALL_NOTEBOOKS = sorted(p.name for p in (REPO / "nbs").glob("*.ipynb"))
RUN_TIMES = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("labroot")
    cfg = tmp_path_factory.mktemp("labcfg")
    settings = cfg / "user-settings"
    for ext, name, body in [("@jupyterlab/apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False}),
                            ("@jupyterlab/notebook-extension", "tracker", {"windowingMode": "none"})]:
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(body))
    # the notebooks refer to ../data_samples and results/: keep that layout inside the server's root (real data: $BRATS_NB_DATA)
    (root / "nbs").mkdir()
    for nb in (REPO / "nbs").glob("*.ipynb"): shutil.copy(nb, root / "nbs" / nb.name)   # as a student has them
    os.symlink(REPO / "data_samples", root / "data_samples")
    os.symlink(REPO / "nbs" / "results", root / "nbs" / "results")   # the recorded results some notebooks read
    token, port = "brats-nb-test-token", _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg / "config"), JUPYTER_DATA_DIR=str(cfg / "data"),
               JUPYTER_RUNTIME_DIR=str(cfg / "runtime"), IPYTHONDIR=str(cfg / "ipython"), MPLCONFIGDIR=str(cfg / "mpl"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), MPLBACKEND="module://matplotlib_inline.backend_inline")
    env.pop("BRATS_NB_SLOW", None)   # the slow cells skip, as by default
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
    "Open nbs/<name> in JupyterLab, run all cells, wait for idle; returns the page (its Run All time in RUN_TIMES)."
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(timeout_s * 1000)
    # a workspace of its own, reset: else Lab restores the notebooks that earlier tests opened, beside this one
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/nbs/{name}?reset&token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext", polling=500)
    page.wait_for_function("""() => { const s = window.jupyterapp.shell.currentWidget.sessionContext;
                               return s.isReady && s.session && s.session.kernel && s.session.kernel.status === 'idle'; }""", polling=500)
    t0 = time.perf_counter()
    page.evaluate("""(ms) => Promise.race([window.jupyterapp.commands.execute('notebook:run-all-cells'),
                       new Promise((_, fail) => setTimeout(() => fail(new Error('run-all-cells did not return')), ms))])""",
                  timeout_s * 1000)
    wait_idle(page, quiet_ms=500)
    RUN_TIMES[name] = round(time.perf_counter() - t0, 1)
    wait_idle(page)
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "run_all_times.json").write_text(json.dumps(dict(sorted({**_recorded_times(), **RUN_TIMES}.items())), indent=1))
    return page


def _recorded_times():
    try: return json.loads((SHOTS / "run_all_times.json").read_text())
    except (OSError, ValueError): return {}


def model_report(page):
    "From the notebook's model: the code cells never executed and the error outputs, as (cell, text)."
    return page.evaluate("""() => {
        const cells = window.jupyterapp.shell.currentWidget.content.model.cells, missed = [], errors = [];
        for (let i = 0; i < cells.length; i++) {
            const c = cells.get(i);
            if (c.type !== 'code') continue;
            if (c.executionCount === null && c.sharedModel.getSource().trim()) missed.push(i);
            for (let j = 0; j < c.outputs.length; j++) {
                const o = c.outputs.get(j).toJSON();
                if (o.output_type === 'error') errors.push([i, `${o.ename}: ${o.evalue}`]);
            }
        }
        return {missed, errors};
    }""")


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


def assert_ran_clean(page, name):
    "Every code cell executed, none with an error output (read from the notebook's model), within MAX_RUN_ALL_S."
    r = model_report(page)
    assert not r["errors"], f"{name}: cells raised: {r['errors']}"
    assert not r["missed"], f"{name}: cells never executed (Run All stopped?): {r['missed']}"
    assert RUN_TIMES[name] <= MAX_RUN_ALL_S, f"{name}: Run All took {RUN_TIMES[name]} s > {MAX_RUN_ALL_S} s"


@contextlib.contextmanager
def notebook_page(browser, lab, name, timeout_s=240):
    "A page on nbs/<name> with every cell run and none raising; closed on the way out."
    page = run_notebook(browser, lab, name, timeout_s)
    try:
        assert_ran_clean(page, name)
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


@pytest.mark.parametrize("name", [n for n in ALL_NOTEBOOKS if n not in WIDGET_NOTEBOOKS])
def test_notebook_runs_clean_in_jupyterlab(lab, browser, name):
    "A student's Run All of each notebook without a widget test: no error, every cell run, in time."
    with notebook_page(browser, lab, name) as page:
        assert page.locator(".jp-Cell").count() > 3


# --- the 3D viewer (NiiVue through ipyniivue): WebGL2 pixels read from screenshots of its canvas -----------------------

def canvas_pixels(canvas):
    "The canvas as an (H, W, 3) int16 array, from a screenshot of the element."
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(np.int16)


def drawn(px):
    "Fraction of pixels that are not the black background."
    return float((abs(px).max(-1) > 12).mean())


def settled(canvas, timeout_s=60, min_drawn=0.10):
    "Screenshots until two in a row are equal (NiiVue finished loading and drawing) and enough of the canvas is drawn."
    import numpy as np
    t0, prev = time.time(), None
    while time.time() - t0 < timeout_s:
        px = canvas_pixels(canvas)
        if prev is not None and np.array_equal(px, prev) and drawn(px) >= min_drawn: return px
        prev = px; time.sleep(0.7)
    return prev


def label_colours(px):
    "Strongly coloured pixels: NCR red, ED green, ET yellow."
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return {"red": int(((r > 140) & (g < 100) & (b < 100)).sum()), "green": int(((g > 140) & (r < g - 40) & (b < g - 40)).sum()),
            "yellow": int(((r > 140) & (g > 110) & (abs(r - g) < 70) & (r - b > 80) & (g - b > 60)).sum())}


def assert_four_tiles(px):
    "NiiVue drew all four tiles of its 2x2 layout (three planes and the rendering), not the 'loading' text on black."
    h, w, _ = px.shape
    assert drawn(px) > 0.10, f"only {drawn(px):.1%} of the canvas drawn"
    for name, tile in {"top-left": px[: h // 2, : w // 2], "top-right": px[: h // 2, w // 2:],
                       "bottom-left": px[h // 2:, : w // 2], "bottom-right": px[h // 2:, w // 2:]}.items():
        assert drawn(tile) > 0.05, f"the {name} tile is empty"


def test_volume_viewer_in_jupyterlab(lab, browser):
    "The 3D viewer of 00_data draws the brain and the labels through WebGL, and redraws when an overlay or the modality changes."
    pytest.importorskip("ipyniivue")
    import numpy as np
    with notebook_page(browser, lab, "00_data.ipynb") as page:
        viewer = page.locator(".widget-hbox").filter(has=page.locator("canvas")).first
        viewer.wait_for()
        canvas = viewer.locator("canvas").first
        viewer.scroll_into_view_if_needed()
        assert canvas.evaluate("c => !!c.getContext('webgl2')")          # NiiVue needs WebGL2 (SwiftShader here)
        px0 = settled(canvas)
        shot(page, viewer, "volume_viewer.png")
        assert_four_tiles(px0)
        c0 = label_colours(px0)
        assert c0["green"] > 50 and c0["yellow"] > 20 and c0["red"] > 20, c0   # ED, ET, NCR of the ground truth
        viewer.locator(".widget-checkbox").filter(has_text="ground truth").locator("input").click(); wait_idle(page)
        px1 = settled(canvas)
        c1 = label_colours(px1)
        assert_four_tiles(px1)
        assert np.abs(px1 - px0).mean() > 0.5 and c1["green"] < c0["green"] / 5 and c1["yellow"] < 10, (c0, c1)
        viewer.locator(".widget-dropdown select").select_option("t1"); wait_idle(page)
        px2 = settled(canvas)
        shot(page, viewer, "volume_viewer_t1_no_labels.png")
        assert_four_tiles(px2)
        assert np.abs(px2 - px1).mean() > 1.0                               # another contrast, another picture

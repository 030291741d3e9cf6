"""The course website (`python tools/build_site.py`): built once into a temporary folder, then checked as a reader
would find it, offline.

- every notebook of nbs/ has a page, titled as the notebook, with its stored outputs: as many figures as the notebook
  shows and an output block for every shown cell with outputs;
- every name of every module's `__all__` has an anchor in the API reference, on its module's page;
- the home page is the README (its title and every section);
- no internal link is broken: each local href/src names a file of the site, and each #anchor exists in its page;
- nothing is loaded from the network (no remote script, style sheet, image or font), and the build writes nothing
  into nbs/ or brats_nb/ and prints no warning.

Skipped when the documentation packages (the dev extras) are not installed.
"""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
NBS, PKG = REPO / "nbs", REPO / "brats_nb"
DOC_PACKAGES = ("sphinx", "myst_nb", "furo", "sphinx-mathjax-offline")
MISSING = [m for m in DOC_PACKAGES if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"documentation packages not installed ({', '.join(MISSING)}): "
                                                      "pip install -c constraints.txt -e '.[dev]'")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class Page(HTMLParser):
    "The ids, links (tag, attribute, value), images, output blocks and headings of one HTML page."

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.ids, self.links, self.imgs, self.outputs, self.headings = set(), [], [], 0, {}
        self._heading, self._permalink = None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key) and (key == "id" or tag == "a"): self.ids.add(a[key])
        for key in ("href", "src"):
            if a.get(key) is not None: self.links.append((tag, key, a[key]))
        if tag == "img": self.imgs.append(a.get("src", ""))
        if tag == "div" and "cell_output" in (a.get("class") or "").split(): self.outputs += 1
        if tag in ("h1", "h2"): self._heading = (tag, [])
        if tag == "a" and "headerlink" in (a.get("class") or "").split(): self._permalink = True

    def handle_data(self, data):
        if self._heading and not self._permalink: self._heading[1].append(data)

    def handle_endtag(self, tag):
        if tag == "a": self._permalink = False
        if self._heading and tag == self._heading[0]:
            self.headings.setdefault(tag, []).append(" ".join("".join(self._heading[1]).split()))
            self._heading = None


def snapshot(*folders):
    "Every file under the folders (caches left out) with its size and modification time."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in folders for p in sorted(d.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    before = snapshot(NBS, PKG)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_site.py"), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, f"build_site.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(f"site built in {seconds:.0f} s")
    pages = {p.relative_to(out).as_posix(): Page(p.read_text(encoding="utf-8")) for p in sorted(out.rglob("*.html"))}
    return {"out": out, "pages": pages, "log": r.stdout + r.stderr, "changed": before != snapshot(NBS, PKG)}


def shown_cells(nb_path):
    "The code cells the site shows (nbdev's `#| hide` cells are left out of the docs)."
    cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    return [c for c in cells if c["cell_type"] == "code" and not re.search(r"^#\|\s*hide\s*$", "".join(c["source"]), re.M)]


def test_build_is_clean(site):
    warnings = [l for l in site["log"].splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", l)]
    assert not warnings, "the build printed warnings:\n" + "\n".join(warnings[:40])
    assert not site["changed"], "building the site changed files under nbs/ or brats_nb/"


def test_every_notebook_has_a_page_with_its_outputs(site):
    problems = []
    notebooks = sorted(NBS.glob("*.ipynb"))
    assert len(notebooks) >= 16
    for nb in notebooks:
        page = site["pages"].get(f"lessons/{nb.stem}.html")
        if page is None: problems.append(f"{nb.name}: no page lessons/{nb.stem}.html"); continue
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        title = next(re.search(r"^#\s+(.+)$", "".join(c["source"]), re.M).group(1) for c in cells
                     if c["cell_type"] == "markdown" and re.search(r"^#\s+", "".join(c["source"]), re.M))
        if title.replace("`", "") not in page.headings.get("h1", []):
            problems.append(f"{nb.name}: title {title!r} is not the page's h1 {page.headings.get('h1')}")
        shown = shown_cells(nb)
        figures = sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                      for c in shown for o in c.get("outputs", []) if WIDGET_MIME not in o.get("data", {}))
        with_outputs = sum(bool(c.get("outputs")) for c in shown)
        images = [s for s in page.imgs if "_images/" in s]
        if len(images) < figures: problems.append(f"{nb.name}: {figures} figures in the notebook, {len(images)} images on its page")
        if page.outputs < with_outputs:
            problems.append(f"{nb.name}: {with_outputs} shown cells with outputs, {page.outputs} output blocks on its page")
    assert not problems, "\n".join(problems)


def public_names():
    "Module -> the names of its `__all__`, read from the source (every module of brats_nb but the nbdev index)."
    out = {}
    for f in sorted(PKG.glob("*.py")):
        if f.name in ("__init__.py", "_modidx.py"): continue
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                out[f.stem] = ast.literal_eval(node.value)
    return out


def test_every_public_name_is_in_the_api_reference(site):
    names = public_names()
    assert {"core", "data", "synth", "mie", "sie", "model", "keypoints", "losses", "metrics", "inference", "trainer",
            "cli", "ablation", "twod", "bench"} <= set(names)
    index = site["pages"].get("api/index.html")
    assert index is not None, "no API reference index api/index.html"
    missing = []
    for module, public in names.items():
        page = site["pages"].get(f"api/{module}.html")
        if page is None: missing.append(f"{module}: no page api/{module}.html"); continue
        if not any(urlsplit(href).path == f"{module}.html" for _, _, href in index.links):
            missing.append(f"{module}: api/index.html does not link to its page")
        missing += [f"{module}.{n}: no anchor brats_nb.{module}.{n} in api/{module}.html" for n in public
                    if f"brats_nb.{module}.{n}" not in page.ids]
    assert not missing, f"{len(missing)} public names missing from the API reference:\n" + "\n".join(missing)


def test_home_page_is_the_readme(site):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    title = re.search(r"^#\s+(.+)$", readme, re.M).group(1).strip()
    sections = [s.strip().replace("`", "") for s in re.findall(r"^##\s+(.+)$", readme, re.M)]
    home = site["pages"]["index.html"]
    assert home.headings.get("h1") == [title], f"home page h1 {home.headings.get('h1')}, README title {title!r}"
    missing = [s for s in sections if s not in home.headings.get("h2", [])]
    assert not missing, f"README sections missing from the home page: {missing}"
    lessons = {urlsplit(h).path for _, _, h in home.links if h.startswith("lessons/")}
    assert {f"lessons/{nb.stem}.html" for nb in NBS.glob("*.ipynb")} <= lessons, "the home page does not link every lesson"


def test_no_broken_internal_link_and_nothing_remote(site):
    out, pages = site["out"], site["pages"]
    broken, remote = [], []
    for name, page in pages.items():
        for tag, attr, value in page.links:
            url = urlsplit(value)
            if url.scheme or url.netloc:
                # a reader may follow a link away; a page must not load anything from elsewhere
                if url.scheme in ("http", "https", "") and not (tag == "a" and attr == "href"):
                    remote.append(f"{name}: <{tag} {attr}={value!r}>")
                continue
            target = (out / name).parent / unquote(url.path) if url.path else out / name
            if url.path.endswith("/") or target.is_dir(): target = target / "index.html"
            if not target.resolve().is_relative_to(out.resolve()) or not target.is_file():
                broken.append(f"{name}: <{tag} {attr}={value!r}>: no file {target.relative_to(out) if target.is_relative_to(out) else target}")
                continue
            if url.fragment and target.suffix == ".html":
                other = pages[target.resolve().relative_to(out.resolve()).as_posix()]
                if unquote(url.fragment) not in other.ids:
                    broken.append(f"{name}: <{tag} {attr}={value!r}>: no anchor #{url.fragment}")
    assert not remote, "pages load from the network:\n" + "\n".join(remote[:40])
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:60])
    css = [p for p in out.rglob("*.css") if re.search(r"url\(\s*['\"]?(https?:)?//", p.read_text(encoding="utf-8", errors="replace"))]
    assert not css, f"style sheets that load from the network: {css}"

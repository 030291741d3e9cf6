#!/usr/bin/env python3
"""Build the course website: every notebook of nbs/ with its stored outputs, an API reference page per module
(each name of its `__all__`, from its docstring) and the README as the home page.

    python tools/build_site.py [--out site] [--verbose]

then open site/index.html in a browser (or `python -m http.server -d site`). Needs the documentation packages
of the dev extras (`pip install -c constraints.txt -e ".[dev]"`): Sphinx, MyST-NB, Furo, sphinx-mathjax-offline.

Notebooks are never executed, nothing is downloaded, and nothing is written into nbs/ or brats_nb/: the sources are
staged in a temporary folder (the notebooks as nbdev's docs show them: `#| hide` cells left out, `#|` directive
lines removed, `#| code-fold` solutions folded as in JupyterLab, interactive widgets replaced by a note) and Sphinx (configuration in
docs/conf.py) writes the site to --out, which is replaced as a whole.
"""
from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # importing brats_nb (autodoc) leaves no __pycache__ in brats_nb/

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NBS = ROOT / "nbs"
LIB = "brats_nb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def lesson_notebooks(nbs: Path = NBS) -> list[Path]:
    "The notebooks the site shows: every `nbs/*.ipynb`, the course map `index.ipynb` first."
    return sorted(nbs.glob("*.ipynb"), key=lambda p: (p.stem != "index", p.name))


def notebook_modules(nbs: Path = NBS) -> dict[str, str]:
    "Module name -> notebook stem, from each notebook's `#| default_exp`, in the order of the notebooks."
    out = {}
    for nb in lesson_notebooks(nbs):
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M)
            if cell["cell_type"] == "code" and m: out[m.group(1)] = nb.stem; break
    return out


def _directives(source: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in source.splitlines() if (m := DIRECTIVE.match(line))}


def _widget_note(output: dict) -> dict:
    "A stored widget output without its state shows nothing in a page: say what it is and where it runs."
    plain = "".join(output["data"].get("text/plain", ""))
    kind = re.match(r"\s*([A-Za-z_]\w*)", plain)
    what = f" (`{kind.group(1)}`)" if kind else ""
    note = f"*An interactive widget{what}: open this notebook in JupyterLab and run it to use it.*"
    return {**output, "data": {"text/markdown": note, "text/plain": note}}


def stage_notebook(src: Path, dest: Path, lessons: list[str]) -> None:
    "Copy a notebook as the site shows it (see the module docstring); the original is only read."
    nb = json.loads(src.read_text(encoding="utf-8"))
    cells = []
    for cell in nb["cells"]:
        cell = copy.deepcopy(cell)
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            flags = _directives(source)
            if "hide" in flags: continue
            source = "\n".join(l for l in source.splitlines() if not DIRECTIVE.match(l)).strip("\n")
            outputs = [_widget_note(o) if WIDGET_MIME in o.get("data", {}) else o for o in cell.get("outputs", [])]
            if not source.strip() and not outputs: continue
            tags = list(cell.setdefault("metadata", {}).get("tags", []))
            if flags.get("code-fold", "").lower() in ("true", "show"):  # a solution: folded, its output too when
                hidden = cell["metadata"].get("jupyter", {}).get("outputs_hidden")  # JupyterLab hides it
                tags.append("hide-cell" if hidden else "hide-input")
            if tags: cell["metadata"]["tags"] = tags
            cell["outputs"] = outputs
        elif src.stem == "index":  # the course map's table names each lesson: make the names links
            source = re.sub(r"^\|\s*`(\w+)`\s*\|", lambda m: f"| [{m.group(1)}]({m.group(1)}.ipynb) |"
                            if m.group(1) in lessons else m.group(0), source, flags=re.M)
        cell["source"] = source
        cells.append(cell)
    nb["cells"] = cells
    dest.write_text(json.dumps(nb, ensure_ascii=False, indent=1), encoding="utf-8")


def _short_title(nb: Path) -> str:
    "'08 · Inference' from '# 08 · Inference: whole volumes, ...'; the course map for index.ipynb."
    if nb.stem == "index": return "Course map"
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        m = re.search(r"^#\s+(.+)$", "".join(cell["source"]), re.M)
        if cell["cell_type"] == "markdown" and m: return m.group(1).split(":")[0].replace("`", "").strip()
    return nb.stem


def _short_value(obj) -> bool:
    "Show a constant's value in the reference only when it is short and says nothing about this machine."
    if not isinstance(obj, (bool, int, float, str, tuple, frozenset)): return False
    r = repr(obj)
    return len(r) <= 80 and str(ROOT) not in r


def lesson_description(nb: Path) -> str:
    "The notebook's summary: the `> ...` lines under its title (nbdev's description), as one paragraph."
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "markdown": continue
        lines = [l[1:].strip() for l in "".join(cell["source"]).splitlines() if l.startswith(">")]
        if lines: return " ".join(lines)
    return ""


def api_page(module: str, lesson: str) -> str:
    "MyST source of one module's reference: the lesson's summary, then every name of its `__all__` in that order."
    full = f"{LIB}.{module}"
    mod = importlib.import_module(full)
    nb = NBS / f"{lesson}.ipynb"
    lines = [f"# {full}", "", f"```{{module}} {full}", "```", "", lesson_description(nb), "",
             f"Taught in the lesson [{_short_title(nb)}](../lessons/{lesson}.ipynb) (`nbs/{lesson}.ipynb`).", ""]
    rst = []  # autodoc's directives produce reStructuredText: they go in an eval-rst block
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj):
            kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
            rst += [f".. {kind}:: {full}.{name}", "   :members:", "   :show-inheritance:", ""]
        elif callable(obj):
            rst += [f".. autofunction:: {full}.{name}", ""]
        else:
            rst += [f".. autodata:: {full}.{name}"] + ([] if _short_value(obj) else ["   :no-value:"]) + [""]
    lines += ["```{eval-rst}", *rst, "```", ""]
    return "\n".join(lines)


def api_index(modules: dict[str, str]) -> str:
    rows = [f"| [{LIB}.{m}]({m}.md) | [{lesson}](../lessons/{lesson}.ipynb) | {lesson_description(NBS / f'{lesson}.ipynb')} |"
            for m, lesson in modules.items()]
    return "\n".join(["# API reference", "",
                      "Every public name of every module (its `__all__`), from its docstring; each module is taught "
                      "in the lesson beside it.", "",
                      "| module | lesson | what it holds |", "|---|---|---|", *rows, "",
                      "```{toctree}", ":hidden:", ":maxdepth: 1", "", *modules, "```", ""])


def home_page(lessons: list[Path]) -> str:
    "The README, then the site's contents."
    readme = (ROOT / "README.md").read_text(encoding="utf-8").rstrip()
    entries = "\n".join(f"{_short_title(nb)} <lessons/{nb.stem}>" for nb in lessons)
    return "\n".join([readme, "", "## On this site", "",
                      "```{toctree}", ":caption: Lessons", ":maxdepth: 1", "", entries, "```", "",
                      "```{toctree}", ":caption: Reference", ":maxdepth: 1", "", "API reference <api/index>", "```", ""])


def stage(src: Path) -> None:
    "Write the Sphinx sources into `src`: index.md (README), lessons/*.ipynb, api/*.md."
    lessons = lesson_notebooks()
    (src / "lessons").mkdir(parents=True); (src / "api").mkdir()
    for nb in lessons: stage_notebook(nb, src / "lessons" / nb.name, [p.stem for p in lessons])
    modules = notebook_modules()
    for module, lesson in modules.items(): (src / "api" / f"{module}.md").write_text(api_page(module, lesson), encoding="utf-8")
    (src / "api" / "index.md").write_text(api_index(modules), encoding="utf-8")
    (src / "index.md").write_text(home_page(lessons), encoding="utf-8")


def _replace_dir(built: Path, out: Path) -> None:
    if out.exists():
        if out.resolve() in (ROOT, NBS, ROOT / LIB, Path.home()) or (any(out.iterdir()) and not (out / ".buildinfo").exists()):
            raise SystemExit(f"{out} exists and is not a site built by this script: give another --out or remove it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(out))


def build(out: Path, verbose: bool = False) -> int:
    "Stage the sources, run Sphinx in a temporary folder, then move the HTML to `out`. Returns Sphinx's exit status."
    from sphinx.cmd.build import build_main

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="brats_nb_site_") as tmp:
        tmp = Path(tmp)
        stage(tmp / "src")
        # myst-nb writes notebook images next to the output folder (../jupyter_execute): keep both in tmp
        html = tmp / "build" / "html"
        args = ["-b", "html", "-E", "-c", str(DOCS), "-d", str(tmp / "build" / "doctrees"), str(tmp / "src"), str(html)]
        rc = build_main(args if verbose else ["-q", *args])
        if rc == 0:
            if (html / "_sources").is_dir() and not any((html / "_sources").iterdir()): (html / "_sources").rmdir()
            _replace_dir(html, out)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "site", help="the site's folder, replaced as a whole (default: site/)")
    p.add_argument("--verbose", action="store_true", help="Sphinx's progress lines too (warnings are always shown)")
    a = p.parse_args(argv)
    missing = [m for m in ("sphinx", "myst_nb", "furo", "sphinx-mathjax-offline") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"missing documentation packages ({', '.join(missing)}): pip install -c constraints.txt -e '.[dev]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = build(a.out.resolve(), a.verbose)
    if rc == 0: print(f"site built in {time.perf_counter() - t0:.0f} s: open {a.out.resolve() / 'index.html'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

# Sphinx configuration of the course website; `python tools/build_site.py` stages the sources and runs Sphinx
# with this folder as its configuration directory. Nothing here reaches the network: notebooks are rendered
# from their stored outputs (never executed), MathJax is served from the site itself (sphinx-mathjax-offline),
# and the Furo theme uses the system's fonts.
import sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's brats_nb, not another installed copy
sys.path.insert(0, str(Path(__file__).parent))  # site_ext
sys.dont_write_bytecode = True  # importing brats_nb for autodoc writes nothing into brats_nb/

_cfg = ConfigParser(delimiters=["="])
_cfg.read(ROOT / "settings.ini", encoding="utf-8")
_cfg = _cfg["DEFAULT"]

project = _cfg["lib_name"]
author = _cfg["author"]
copyright = _cfg["copyright"]
release = version = _cfg["version"]

extensions = [
    "myst_nb",                 # notebooks (.ipynb) and MyST Markdown pages
    "sphinx.ext.autodoc",      # the API reference, from the docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: math renders offline
    "site_ext",                # Markdown docstrings; a constant's doc is its line's comment
]
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
default_role = "literal"       # `name` in a docstring is code, as in the notebooks' Markdown
nitpicky = False
smartquotes = False           # 'auto' in a docstring stays a Python string, not curly quotes

# notebooks: the stored outputs as they are, never executed
nb_execution_mode = "off"
nb_merge_streams = True
nb_ipywidgets_js = {}          # no widget JavaScript from a CDN; widget outputs become a note when staged
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

# API reference
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # a network without a docstring does not show torch.nn.Module's
add_module_names = False
toc_object_entries_show_parents = "hide"

html_theme = "furo"
html_title = f"{project} {release}"
html_static_path = [str(Path(__file__).parent / "_static")]
html_css_files = ["site.css"]
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {"navigation_with_keys": True}

"""Sphinx extension of the course website: brats_nb's docstrings are written in Markdown (as the notebooks are),
autodoc reads reStructuredText. Each docstring is turned into the few reST constructs it needs: `code` spans
become inline literals, and *, |, _ and \\ outside them are literal characters. A constant has no docstring of its
own (autodoc would show its type's, e.g. dict's): the comment at the end of its assignment line is its doc.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import io
import re
import tokenize
from functools import lru_cache

_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_SPECIAL = re.compile(r"([\\*|_`])")


def md_to_rst(text: str) -> str:
    "Markdown prose (paragraphs, `code` spans) as reStructuredText that renders the same."
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text)) if text.strip() else []
    out = []
    for para in paragraphs:
        para = "\n".join(line.strip() for line in para.splitlines())  # indentation means nothing in Markdown prose
        pieces, pos = [], 0
        for m in _CODE.finditer(para):
            pieces.append(_SPECIAL.sub(r"\\\1", para[pos:m.start()]))
            code = " ".join(m.group(2).split())
            # escaped spaces around the literal let it touch letters ("`Path`s") as Markdown allows
            pieces.append(f"\\ ``{code}``\\ " if "``" not in code else _SPECIAL.sub(r"\\\1", m.group(0)))
            pos = m.end()
        pieces.append(_SPECIAL.sub(r"\\\1", para[pos:]))
        out.append("".join(pieces))
    return "\n\n".join(out)


@lru_cache(maxsize=None)
def constant_comments(modname: str) -> dict[str, str]:
    "NAME -> the comment ending the first line of `NAME = ...` at the top level of the module's source."
    try:
        source = inspect.getsource(importlib.import_module(modname))
    except (ImportError, OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and node.lineno in comments: out[t.id] = comments[node.lineno]
    return out


def _docstring(app, what, name, obj, options, lines):
    if what == "data":
        modname, _, attr = name.rpartition(".")
        lines[:] = [constant_comments(modname).get(attr, "")]
    lines[:] = md_to_rst("\n".join(lines)).splitlines() + [""]


def setup(app):
    app.connect("autodoc-process-docstring", _docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

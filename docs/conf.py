"""Sphinx configuration: the guide, the paper pages and the API reference of ``bilevel``.

Build (warnings as errors, as CI does)::

    .venv/bin/pip install -e ".[docs]"
    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import dataclasses
import os
import pkgutil
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))
os.environ.setdefault("MPLBACKEND", "Agg")

from sphinx.ext.napoleon.docstring import GoogleDocstring  # noqa: E402
from sphinx.util import logging  # noqa: E402

import bilevel  # noqa: E402

logger = logging.getLogger(__name__)

project = "bilevel"
author = "bilevel authors"
copyright = "bilevel authors"
release = version = bilevel.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# img/ holds the figures the Markdown pages embed; nothing in it is a source page.
exclude_patterns = ["_build", "img", "Thumbs.db", ".DS_Store"]

# --- autodoc / napoleon: the library's docstrings are Google style ("Args:", "Returns:", "Raises:") ---
autodoc_default_options = {"member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
# defaults as written in the source (`torch.optim.Adam`, not "<class ...>", which no signature parser reads)
autodoc_preserve_defaults = True
# Optional extras (`pip install -e ".[ray]"`): bilevel.search imports them lazily, so a docs-only
# install still imports every module; mock them anyway in case an annotation or default needs one.
autodoc_mock_imports = ["ray", "optuna"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True


def _attribute_docstring_as_prose(self):
    """Napoleon reads the first line of an attribute's or property's docstring as Google's
    ``type: description`` and would turn "The size of the distilled set: ``num_points``..." into
    a "Type:" field. The library's such docstrings are prose (the type comes from the annotation),
    so parse them as plain text, sections (Args:, ...) still recognised."""
    return self.__class__(self._dedent(self._consume_to_end()), self._config).lines()


GoogleDocstring._parse_attribute_docstring = _attribute_docstring_as_prose

# --- MyST: the Markdown pages (guide, design, benchmarks, one page per paper) ---
myst_heading_anchors = 3

# --- HTML ---
html_theme = "furo"
html_title = f"bilevel {release}"
html_static_path = []


# --- Markdown links to Markdown files outside docs/ ---
# The pages link to ../README.md, ../benchmarks/README.md, ... so that the links work where the
# Markdown is read directly (GitHub, an editor). Sphinx cannot build files outside docs/ as pages,
# and MyST would report each such link as a missing document (myst.xref_missing). Link them as
# downloads instead (MyST's ``path:`` scheme), as MyST already does for ../benchmarks/*.py; links
# between the pages themselves stay checked.
_MD_LINK = re.compile(r"\]\(([^()\s#]+\.md)(#[^()\s]*)?\)")


def _outside_markdown_as_downloads(app, docname, source):
    if not str(app.env.doc2path(docname)).endswith(".md"):
        return
    srcdir = Path(app.srcdir).resolve()
    here = (srcdir / docname).parent

    def link(m):
        target = (here / m.group(1)).resolve()
        return m.group(0) if srcdir in target.parents else f"](path:{m.group(1)})"

    source[0] = _MD_LINK.sub(link, source[0])


# --- defaults no signature parser reads ---
# A dataclass's generated __init__ shows a default_factory as ``field = <factory>``, a class
# default as ``<class 'torch.optim.adam.Adam'>`` and an Enum member as ``<Granularity.ELEMENT:
# 'element'>`` (autodoc_preserve_defaults cannot reach generated code). The Python domain cannot
# parse these and would print the whole signature raw; show ``dict()``, ``torch.optim.adam.Adam``
# and ``Granularity.ELEMENT`` instead.
def _parseable_defaults(app, what, name, obj, options, signature, return_annotation):
    if not signature or "<" not in signature:
        return None
    factories = (
        iter(
            f.default_factory
            for f in dataclasses.fields(obj)
            if f.init and f.default_factory is not dataclasses.MISSING
        )
        if dataclasses.is_dataclass(obj)
        else iter(())
    )

    def call(_match):
        qualname = getattr(next(factories, None), "__qualname__", "")
        return f"= {qualname}()" if qualname and all(p.isidentifier() for p in qualname.split(".")) else "= ..."

    signature = re.sub(r"= <factory>", call, signature)
    signature = re.sub(r"<(\w+(?:\.\w+)+): [^<>]*>", r"\1", signature)  # an Enum member inside a default's repr
    return re.sub(r"= <class '([\w.]+)'>", r"= \1", signature), return_annotation


# --- the reference stays complete: a new public module or top-level name without a page warns ---
def _reference_complete(app):
    api = Path(app.srcdir, "api")
    pages = {f.name: f.read_text(encoding="utf-8") for f in api.glob("*.rst")}
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", "\n".join(pages.values()), re.M))
    public = ["bilevel"] + [
        m.name
        for m in pkgutil.walk_packages(bilevel.__path__, "bilevel.")
        if not any(part.startswith("_") for part in m.name.split("."))
    ]
    for name in sorted(set(public) - documented):
        logger.warning("public module %s has no automodule in docs/api/ (add it to a page there)", name)
    top = pages.get("bilevel.rst", "")
    for name in bilevel.__all__:
        if not re.search(rf"\bbilevel\.{name}\b", top):
            logger.warning("bilevel.%s is in bilevel.__all__ but not on docs/api/bilevel.rst", name)


def setup(app):
    app.connect("builder-inited", _reference_complete)
    app.connect("source-read", _outside_markdown_as_downloads)
    app.connect("autodoc-process-signature", _parseable_defaults)

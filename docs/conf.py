"""Sphinx configuration: the guide, the paper pages and the API reference of ``bilevel``.

Build (warnings as errors, as CI does)::

    .venv/bin/pip install -e ".[docs]"
    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))
os.environ.setdefault("MPLBACKEND", "Agg")

import bilevel  # noqa: E402
from sphinx.ext.napoleon.docstring import GoogleDocstring  # noqa: E402

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


def setup(app):
    app.connect("source-read", _outside_markdown_as_downloads)

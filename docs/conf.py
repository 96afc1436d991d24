"""Sphinx configuration for optax-gradhealth.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors; CI runs
it through ``tests/test_docs.py``). Pages are MyST Markdown. The API reference and the
metrics catalogue are generated from the code by the local extension
``docs/_ext/gh_docs.py``, so they cannot drift from it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: import the checkout
sys.path.insert(0, os.path.join(HERE, "_ext"))

import optax_gradhealth  # noqa: E402

project = "optax-gradhealth"
author = "optax-gradhealth authors"
copyright = "2026, optax-gradhealth authors"
release = optax_gradhealth.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "gh_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math, ::: fences, and anchors on headings up to level 3 so
# that pages can link to `concepts.md#skip-semantics`.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings (Args / Returns / Example / Attributes / References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as :ivar: fields: NamedTuple fields are documented once, by the class's
# Attributes section, without a second (duplicate) object description per field.
napoleon_use_ivar = True
napoleon_use_rtype = False
# Field types come from the annotations in the signature; repeating them (as
# ``jax.jaxlib._jax.Array``) in every Attributes entry is noise.
napoleon_attr_annotations = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
add_module_names = False

# References to jax/optax/numpy types in signatures cannot be resolved offline (no
# intersphinx: CI has no network); unresolved references are therefore not errors.
# Every other warning (broken toctree, unknown directive, bad docstring markup, a
# missing page or anchor) fails the `-W` build.
nitpicky = False
# Pages written by several hands use plain Markdown headings; a skipped heading level
# is a style matter, not an error.
suppress_warnings = ["myst.header"]

html_title = f"optax-gradhealth {release}"
if importlib.util.find_spec("furo") is not None:
    html_theme = "furo"
else:  # pragma: no cover - furo is in the docs/test extras
    html_theme = "alabaster"
html_static_path: list[str] = []
pygments_style = "sphinx"

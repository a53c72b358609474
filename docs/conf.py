"""Sphinx configuration of ntkit's documentation site.

Build (warnings are errors): ``make -C docs html``, or
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The API pages (``docs/api/``) are written from the public modules' ``__all__`` at the start of every build
(``docs/_ext/public_api.py``), and sphinx-gallery runs every ``examples/plot_*.py`` at its small default size.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import public_api  # noqa: E402

import ntkit  # noqa: E402

project = "ntkit"
author = "the ntkit authors"
copyright = "the ntkit authors, Apache-2.0"
release = ntkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 served from _static/: the site's math renders without the internet
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext", "**/*.ipynb", "**/*.py", "**/*.zip", "**/*.md5", "**/*.codeobj.json"]
templates_path = ["_templates"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: written here from __all__, then autosummary makes one page per name
public_api.write_api_pages(HERE / "api")
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "class"
typehints_fully_qualified = False
always_document_param_types = False
typehints_document_rtype = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False


def _data_doc(app, what, name, obj, options, lines):
    """Constants re-exported by a package carry their ``#:`` comment where they are set, in a submodule;
    autodoc looks only in the exporting module, so fill the text in from there."""
    if what in ("data", "attribute") and not any(line.strip() for line in lines):
        module, _, attr = name.rpartition(".")
        try:
            doc = public_api.docstring(module, attr)
        except Exception:
            return
        lines[:] = doc.splitlines()


def _skip_foreign(app, what, name, obj, skip, options):
    """Document only what ntkit defines: not the members scikit-learn, torch or gpytorch add to subclasses
    (``set_fit_request``...), whose docstrings refer to those projects' own pages."""
    module = getattr(obj, "__module__", None) or getattr(getattr(obj, "fget", None), "__module__", None)
    if what == "class" and isinstance(module, str) and not module.startswith("ntkit"):
        return True
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _data_doc)
    app.connect("autodoc-skip-member", _skip_foreign)


# the gallery: every examples/plot_*.py is run at its small default size (--full is for the real figures)
sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_memory": False,
    "matplotlib_animations": False,
    "image_srcset": [],
}
warnings.filterwarnings("ignore", message="Matplotlib is currently using agg", category=UserWarning)
# sphinx-autodoc-typehints 3.x calls an API Sphinx 9 deprecates (a Python warning, not a Sphinx one)
warnings.filterwarnings("ignore", message=".*set_application.* is deprecated", module="sphinx_autodoc_typehints")
warnings.filterwarnings("ignore", message="FigureCanvasAgg is non-interactive", category=UserWarning)

# Attribute lists naming several fields at once ("mean, variance: ...") make Sphinx look the first name up as a
# cross-reference, ambiguous when two records share a field name: that lookup is not a documentation error
suppress_warnings = ["ref.python"]

html_theme = "furo"
html_title = f"ntkit {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False

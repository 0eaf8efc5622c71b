"""Sphinx configuration of the cellvi documentation site (see docs/README.md to build it)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # document this checkout's code, installed or not

import cellvi  # noqa: E402

project = "cellvi"
author = "the cellvi developers"
copyright = "2026, the cellvi developers"  # noqa: A001
release = version = cellvi.__version__

extensions = [
    "myst_parser",  # Markdown pages (README, guides, BENCHMARKS)
    "sphinx.ext.autodoc",  # API reference from the docstrings
    "sphinx.ext.autosummary",  # one page per documented object (docs/api/generated/, not committed)
    "sphinx.ext.napoleon",  # numpydoc-style sections (Parameters, Returns, Notes)
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links work as on GitHub

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = f"cellvi {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_static_path: list[str] = []
html_last_updated_fmt = None

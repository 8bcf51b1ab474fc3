"""What the notebooks' first cell does, in one call: `from medlora.notebook import setup; setup()`.

Light on purpose (no transformers import): notebook 04 must still import Unsloth before transformers.
"""

from __future__ import annotations

import os
from pathlib import Path


def setup() -> Path:
    """Work from the repo root (move there from notebooks/), or stop with a clear message; returns the root.

    Every path in the notebooks is relative to the repo root. Progress bars render as widgets in JupyterLab
    (ipywidgets is a dependency), so nothing is switched off here.
    """
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "pyproject.toml").is_file():
        os.chdir(here.parent)
    root = Path.cwd()
    if not ((root / "pyproject.toml").is_file() and (root / "src" / "medlora").is_dir()):
        raise RuntimeError(f"start this notebook from the medlora repo root or its notebooks/ folder, not {root}")
    print("working directory:", root)
    return root

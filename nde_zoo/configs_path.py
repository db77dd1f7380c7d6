"""Where the Hydra configs and the examples are: inside the installed wheel, or at the repository root."""

from __future__ import annotations

from pathlib import Path

import nde_zoo

__all__ = ["config_dir", "examples_dir"]


def config_dir() -> Path:
    """``nde_zoo/configs`` in an installed wheel (hatch force-include), else ``<repo>/configs``."""
    package = Path(nde_zoo.__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "model").is_dir():
            return candidate
    raise FileNotFoundError(
        f"nde_zoo's configs were not found next to the package ({package / 'configs'}) nor at the "
        f"repository root ({package.parent / 'configs'}); reinstall nde_zoo"
    )


def examples_dir() -> Path:
    """``nde_zoo/examples`` in an installed wheel (hatch force-include), else ``<repo>/examples``.

    ``python -c "from nde_zoo.configs_path import examples_dir; print(examples_dir())"`` prints it; the
    examples of docs/extending.md run from there: ``python <that folder>/extending/new_model.py``.
    """
    package = Path(nde_zoo.__file__).resolve().parent
    for candidate in (package / "examples", package.parent / "examples"):
        if (candidate / "extending").is_dir():
            return candidate
    raise FileNotFoundError(
        f"nde_zoo's examples were not found next to the package ({package / 'examples'}) nor at the "
        f"repository root ({package.parent / 'examples'}); reinstall nde_zoo"
    )

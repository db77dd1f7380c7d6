"""Where the Hydra configs are: inside the installed wheel, or at the repository root."""

from __future__ import annotations

from pathlib import Path

import nde_zoo

__all__ = ["config_dir"]


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

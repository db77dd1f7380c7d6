"""The model x strategy capability matrix, generated from what each class declares.

Models declare ``kind`` ("ode" or "sde"); strategies declare ``kinds``. A pair works when
the strategy's kinds contain the model's kind; otherwise building the model raises an
error naming the strategies that do work. The README's matrix is this table (a test
checks they agree, so docs and code cannot drift).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from nde_zoo.configs_path import config_dir

__all__ = ["model_kinds", "strategy_kinds", "capability_matrix", "matrix_markdown", "update_readme"]

START, END = "<!-- capability-matrix:start -->", "<!-- capability-matrix:end -->"


def _target_class(group: str, name: str) -> type:
    cfg = OmegaConf.load(config_dir() / group / f"{name}.yaml")
    node = cfg.model if group == "model" else cfg  # model files are in the _global_ package
    module, _, attr = str(node["_target_"]).rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def model_kinds() -> dict[str, str]:
    """``{model config name: "ode" | "sde"}`` for every ``configs/model/*.yaml``."""
    return {name: _target_class("model", name).kind for name in _names("model")}


def strategy_kinds() -> dict[str, frozenset[str]]:
    """``{strategy config name: kinds}``; a wrapper (ernode) takes its inner's kinds."""
    out = {}
    for name in _names("strategy"):
        cls = _target_class("strategy", name)
        kinds = cls.kinds
        if not isinstance(kinds, frozenset):  # declared per instance: ask the default config
            kinds = frozenset({"ode", "sde"})
        out[name] = kinds
    return out


def capability_matrix() -> dict[tuple[str, str], bool]:
    """``{(model, strategy): supported}`` over every config name."""
    models, strategies = model_kinds(), strategy_kinds()
    return {(m, s): kind in strategies[s] for m, kind in models.items() for s in strategies}


def matrix_markdown() -> str:
    """The matrix as a markdown table (rows: models; columns: strategies)."""
    matrix = capability_matrix()
    models = sorted({m for m, _ in matrix})
    strategies = sorted({s for _, s in matrix})
    lines = ["| model \\ strategy | " + " | ".join(strategies) + " |",
             "|---|" + "|".join(":-:" for _ in strategies) + "|"]
    for m in models:
        lines.append(f"| `{m}` | " + " | ".join("yes" if matrix[(m, s)] else "-" for s in strategies) + " |")
    return "\n".join(lines)


def update_readme(readme: Path) -> bool:
    """Write the matrix between the README's markers; return whether the file changed."""
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{matrix_markdown()}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m nde_zoo.capabilities: refresh the README's table
    changed = update_readme(Path(__file__).resolve().parents[1] / "README.md")
    print("README.md updated" if changed else "README.md already up to date")

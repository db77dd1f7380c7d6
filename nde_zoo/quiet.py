"""Third-party messages a zoo run does not need, filtered by name (nothing of nde_zoo's own is hidden).

- Lightning's advertisement for litlogger, logged at INFO on every ``Trainer`` with another logger
  (logger ``lightning.pytorch.utilities.rank_zero``, message starting ``💡 Tip: For seamless cloud logging``);
- Lightning 2.6's own use of a torch API that torch 2.13 deprecates (``isinstance(treespec, LeafSpec)``,
  warned from ``lightning.pytorch.utilities._pytree`` at the first training step): nothing a user can change.

The command line installs both filters (:func:`install`, from ``nde_zoo.train.run``); from Python call
it yourself if you want them.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["install", "LITLOGGER_TIP", "PYTREE_DEPRECATION"]

#: the start of Lightning's litlogger tip.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
#: the message (a regular expression) and module of Lightning's treespec deprecation warning.
PYTREE_DEPRECATION = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"lightning\.pytorch\.utilities\._pytree",
)


class _DropByPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Filter the messages listed in the module docstring (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropByPrefix) and f.prefix == LITLOGGER_TIP for f in logger.filters):
        logger.addFilter(_DropByPrefix(LITLOGGER_TIP))
    message, module = PYTREE_DEPRECATION
    warnings.filterwarnings("ignore", message=message, module=module)

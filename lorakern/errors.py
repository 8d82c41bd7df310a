"""lorakern's exceptions: one base class, so a caller (and the CLI) can tell our errors from others.

Every error lorakern raises about bad input is a ``LorakernError`` (a ``ValueError``, so existing
``except ValueError`` code keeps working) whose message names the value and the fix. A missing optional
package is an ``ImportError`` naming the extra that installs it (``require``).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class LorakernError(ValueError):
    """Bad input to lorakern: the message names the value and the fix."""


class AdapterError(LorakernError):
    """A named adapter is unknown, exists already, or cannot be combined, saved or loaded as asked."""


class ConfigError(LorakernError):
    """A LoraConfig field (ours or PEFT's) has a value lorakern does not support."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra to install (pip install 'lorakern[extra]')."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" for {purpose}" if purpose else ""
        raise ImportError(f"{module} is needed{why} but is not installed; install it with "
                          f"pip install 'lorakern[{extra}]'") from exc


__all__ = ["AdapterError", "ConfigError", "LorakernError", "require"]

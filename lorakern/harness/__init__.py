"""The RoBERTa GLUE and SQuAD harness: ``run_glue`` and ``run_squad`` (the ``lorakern glue`` / ``lorakern
squad`` commands as functions). Loaders in ``data``, metrics in ``metrics``, models in ``models``, the
training loop in ``train``; names load on first use so ``import lorakern.harness.metrics`` stays light.
"""
from __future__ import annotations

import importlib

_LAZY = {"run_glue": "lorakern.harness.glue", "run_squad": "lorakern.harness.squad",
         "RunOptions": "lorakern.harness.run", "SquadOptions": "lorakern.harness.squad",
         "TrainConfig": "lorakern.harness.train"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakern.harness' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

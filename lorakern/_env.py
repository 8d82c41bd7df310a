"""lorakern's environment switches, read on every LoRA call at a fraction of ``os.environ.get``'s cost.

A call reads up to four switches ($LORAKERN_BACKEND, $LORAKERN_NATIVE, $LORAKERN_ISA, $LORAKERN_FORMULATION)
so that setting one takes effect at the next call. ``os.environ.get`` encodes the key and looks it up through
three Python-level methods (~0.9 us a read); at 16 tokens a layer's whole C LoRA pass costs ~8 us. os.environ
keeps its contents in a dict of encoded keys and values (``_data``, which every assignment to os.environ,
``del``, ``putenv`` through it and pytest's monkeypatch.setenv update), and ``get`` reads that dict directly;
where a Python has no such dict, ``os.environ.get`` serves.
"""
from __future__ import annotations

import os
from typing import Optional

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``. Nothing is cached here: under torch.compile a module-level cache that
    a call fills is guarded on, and the next call would recompile."""
    if _DATA is None or _ENCODE is None or _DECODE is None:
        return os.environ.get(name, default)
    value = _DATA.get(_ENCODE(name))
    return default if value is None else _DECODE(value)

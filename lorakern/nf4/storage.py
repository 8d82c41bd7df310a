"""NF4Storage: the tensors of one 4-bit weight, its decoding, and bitsandbytes' state-dict keys.

The packed weight and its statistics are buffers (they move with ``.to()`` and live in ``state_dict``)
in bitsandbytes' layout. With ``quant_storage`` set to a float dtype (bitsandbytes' option of that name)
the packed bytes are instead held, bit for bit, in a frozen float Parameter, so that FSDP2's
``fully_shard`` shards them like any weight; ``NF4Storage.packed`` always reads them back as uint8.
``state_entries`` uses the keys transformers + bitsandbytes write for a ``Params4bit`` (``weight``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so either side loads the other.
"""
from __future__ import annotations

import json
import math
from typing import Optional, Union

import torch
from torch import nn

from lorakern import native
from lorakern.core import nf4 as nf4_core
from lorakern.errors import LorakernError
from lorakern.nf4.codec import _DTYPES

STATE_KEY = "quant_state.bitsandbytes__nf4"
# Rows of a weight dequantized at once on the torch path: at most this many elements per chunk.
CHUNK_ELEMENTS = 1 << 24
# What holds the packed bytes: "uint8" a buffer (replicated by DDP and FSDP), a float dtype a frozen
# Parameter holding the same bytes reinterpreted (FSDP2 shards Parameters only, along dim 0).
QUANT_STORAGES = {"uint8": torch.uint8, **_DTYPES}


def quant_storage_name(value: Union[str, torch.dtype]) -> str:
    """The name in QUANT_STORAGES of ``value`` (a name or a torch dtype, as bitsandbytes takes it)."""
    for name, dtype in QUANT_STORAGES.items():
        if value == name or value == dtype:
            return name
    raise LorakernError(f"quant_storage={value!r} is not supported; use 'uint8' (a buffer, replicated under FSDP) or "
                     f"'bfloat16', 'float16', 'float32' (a frozen Parameter FSDP2 shards; under a "
                     f"MixedPrecisionPolicy pick its param_dtype)")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # A DTensor here is an FSDP2 shard (FSDP2's sharded Parameter is a DTensor instance). Checked by name:
    # this runs on every decode, and torch.distributed may be absent.
    return type(tensor).__name__ == "DTensor"


def _bytes_as(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``packed`` reinterpreted as ``dtype`` (shape (m, 1), as bitsandbytes' quant_storage).

    A bit copy, never a value conversion: zero bytes pad the end to a whole number of elements.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    flat = packed.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // size) * size, dtype=torch.uint8, device=packed.device)
    padded[: flat.numel()] = flat
    return padded.view(dtype).reshape(-1, 1)


class NF4Storage(nn.Module):
    """The tensors of one NF4 weight, its decoding, and bitsandbytes' state-dict keys.

    ``packed_storage`` holds the packed codes: a uint8 buffer of shape (ceil(n/2), 1), or with a float
    ``quant_storage`` a frozen Parameter of shape (ceil(ceil(n/2) / itemsize), 1) holding the same bytes
    (zero-padded to whole elements); read them through ``packed``, always uint8 (ceil(n/2), 1).
    Buffers: ``quant_map`` (16 fp32), ``absmax`` (fp32 per block, or uint8 codes with double
    quantization) and, with double quantization, ``nested_absmax``, ``nested_map`` and ``offset``. They
    stay buffers under every quant_storage: 1/32 of the packed bytes or less, FSDP2 replicates them.
    """

    def __init__(self, state: dict, quant_storage: Union[str, torch.dtype] = "uint8") -> None:
        super().__init__()
        self.shape = tuple(state["shape"])
        self.dtype_name = state["dtype"]
        self.blocksize = int(state["blocksize"])
        self.double_quant = "nested_absmax" in state
        self.quant_storage = quant_storage_name(quant_storage)
        packed = state["packed"]
        if packed.dtype != torch.uint8:
            raise LorakernError(f"the NF4 state's packed codes are {packed.dtype}, expected uint8; view them with "
                             f".view(torch.uint8) (quant_storage applies when building the storage)")
        if self.quant_storage == "uint8":
            self.register_buffer("packed_storage", packed)
        else:
            if packed.numel() != (self.numel + 1) // 2:
                raise LorakernError(f"NF4 state does not fit a {self.shape} weight: packed has {packed.numel()} bytes, "
                                 f"expected {(self.numel + 1) // 2}; it belongs to another weight")
            self.packed_storage = nn.Parameter(_bytes_as(packed, QUANT_STORAGES[self.quant_storage]),
                                               requires_grad=False)
        self.register_buffer("quant_map", state["quant_map"])
        self.register_buffer("absmax", state["absmax"])
        if self.double_quant:
            self.register_buffer("nested_absmax", state["nested_absmax"])
            self.register_buffer("nested_map", state["nested_map"])
            self.register_buffer("offset", torch.as_tensor(state["offset"], dtype=torch.float32).reshape(()))
        self._check()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes as uint8 of shape (ceil(n/2), 1): a view of ``packed_storage``, never a copy.

        Under FSDP2 this is valid while the module's parameters are unsharded (in its forward and backward).
        """
        stored = self.packed_storage
        if stored.dtype == torch.uint8:
            return stored
        expected = QUANT_STORAGES[self.quant_storage]
        if stored.dtype != expected:
            # FSDP2's MixedPrecisionPolicy casts floating parameters to its param_dtype on all-gather; that
            # converts values and destroys the bytes (bf16 rounding, NaN canonicalisation).
            raise LorakernError(f"the packed NF4 bytes were cast from {expected} to {stored.dtype} (a MixedPrecisionPolicy "
                             f"param_dtype, or a .to() that bypassed NF4Storage); build the model with "
                             f"quant_storage={str(stored.dtype).replace('torch.', '')!r} to match param_dtype")
        if _is_dtensor(stored):
            raise LorakernError(f"the packed NF4 bytes of this {self.shape} weight are sharded by FSDP2 (a DTensor of "
                             f"{stored.shape[0]} x {expected} rows); they are whole only inside the sharded module's "
                             f"forward and backward. Read them there, or gather them first: full_packed() on every rank")
        return self._codes(stored)

    def full_packed(self) -> torch.Tensor:
        """``packed``, gathered first when FSDP2 has sharded it: a collective that every rank must call."""
        stored = self.packed_storage
        if not _is_dtensor(stored):
            return self.packed
        return self._codes(stored.full_tensor())

    def _codes(self, stored: torch.Tensor) -> torch.Tensor:
        """The packed codes inside a float ``packed_storage`` (whole, not a shard): its bytes as uint8,
        the zero padding to whole elements cut off, shape (ceil(n/2), 1)."""
        return stored.reshape(-1).view(torch.uint8)[: (self.numel + 1) // 2].reshape(-1, 1)

    def _apply(self, fn, recurse=True):
        """Follow device moves only: ``.to(dtype)``/``.half()`` on a model must not touch codes or absmaxes.

        A float ``quant_storage`` is a floating Parameter, which ``model.to(torch.bfloat16)`` would
        otherwise convert by value; this keeps its dtype (and its bytes) whatever the cast.
        """
        for tensors in (self._parameters, self._buffers):
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                if target == tensor.device:
                    continue
                moved = tensor.detach().to(device=target)
                tensors[name] = nn.Parameter(moved, requires_grad=tensor.requires_grad) \
                    if isinstance(tensor, nn.Parameter) else moved
        return self

    def _check(self) -> None:
        n, blocks = self.numel, -(-self.numel // self.blocksize)
        expected = {"packed": ((n + 1) // 2, 1), "absmax": (blocks,), "quant_map": (16,)}
        if self.double_quant:
            expected.update(nested_absmax=(-(-blocks // nf4_core.NESTED_BLOCKSIZE),), nested_map=(256,))
        for name, shape in expected.items():
            found = tuple(getattr(self, name).shape)
            if found != shape:
                raise LorakernError(f"NF4 state does not fit a {self.shape} weight at blocksize {self.blocksize}: {name} "
                                 f"has shape {found}, expected {shape}; it belongs to another weight or blocksize")

    def nbytes(self) -> int:
        """Bytes of the packed codes and the block statistics (the code tables, shared by all, excluded)."""
        stats = sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                    if name not in ("quant_map", "nested_map", "packed_storage"))
        return (self.numel + 1) // 2 + stats

    def absmax_values(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        nested = self.nested_absmax.repeat_interleave(nf4_core.NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return self.nested_map[self.absmax.long()] * nested + self.offset

    def dequantize_flat(self, start: int, stop: int, dtype: torch.dtype, absmax: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """Elements [start, stop) of the flattened weight: NF4[q] * absmax in fp32, rounded once to dtype."""
        absmax = self.absmax_values() if absmax is None else absmax
        bs = self.blocksize
        # One reference for the whole call: the native decoder reads through a raw pointer.
        whole = self.packed
        # torch.compile traces the torch decoding below (a ctypes call would break the graph)
        library = (native.library() if whole.device.type == "cpu" and start % 2 == 0
                   and not torch.compiler.is_compiling() else None)
        if library is not None:
            out = torch.empty(stop - start, dtype=torch.float32)
            absmax = absmax.contiguous()
            library.nf4_decode_f32(whole.data_ptr(), start, stop - start, bs, absmax.data_ptr(),
                                   self.quant_map.contiguous().data_ptr(), out.data_ptr())
            return out.to(dtype)
        if start % bs == 0 and start % 2 == 0:
            # Whole blocks from an even element: one table lookup per byte (both nibbles), then a broadcast
            # multiply by the block's absmax; no per-element index arithmetic.
            index = torch.arange(256, device=whole.device)
            pair_table = torch.stack([self.quant_map[index >> 4], self.quant_map[index & 15]], dim=1)
            packed = whole[start // 2:(stop + 1) // 2, 0]
            values = nn.functional.embedding(packed.to(torch.int32), pair_table).reshape(-1)[: stop - start]
            blocks = absmax[start // bs: -(-stop // bs)]
            full = (stop - start) // bs * bs
            out = torch.empty(stop - start, dtype=torch.float32, device=packed.device)
            torch.mul(values[:full].view(-1, bs), blocks[: full // bs, None], out=out[:full].view(-1, bs))
            if full < stop - start:
                torch.mul(values[full:], blocks[-1], out=out[full:])
            return out.to(dtype)
        first, last = start // 2, (stop + 1) // 2
        packed = whole[first:last, 0]
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[start - 2 * first: start - 2 * first + stop - start]
        index = torch.arange(start, stop, device=packed.device) // bs
        return (self.quant_map[codes.long()] * absmax[index]).to(dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole weight in ``dtype`` (default: the original weight's dtype)."""
        dtype = dtype or _DTYPES[self.dtype_name]
        return self.dequantize_flat(0, self.numel, dtype).reshape(self.shape)

    def row_chunks(self, dtype: torch.dtype):
        """Yield (first row, rows of the (out, in) weight dequantized to dtype), CHUNK_ELEMENTS at a time."""
        rows, cols = self.shape
        # Chunks that start on a block boundary and an even element take the fast decoding.
        align = math.lcm(self.blocksize, 2) // math.gcd(math.lcm(self.blocksize, 2), cols)
        step = max(align, CHUNK_ELEMENTS // max(cols, 1) // align * align)
        absmax = self.absmax_values()
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield r0, self.dequantize_flat(r0 * cols, r1 * cols, dtype, absmax).reshape(r1 - r0, cols)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Nothing under this module's own prefix: the owning layer writes these buffers under
        bitsandbytes' keys (state_entries)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Nothing to read here: the owning layer reads bitsandbytes' keys and rebuilds this storage."""

    # ---- bitsandbytes' keys -----------------------------------------------------------------------
    def state_entries(self) -> dict[str, torch.Tensor]:
        """{suffix after "weight": tensor}, as bitsandbytes' Params4bit serialises its quant state.

        The weight is always the uint8 bytes, whatever quant_storage holds them. When FSDP2 has sharded
        them, they are gathered here: ``state_dict()`` is then a collective that every rank calls.
        """
        entries = {"": self.full_packed(), ".absmax": self.absmax, ".quant_map": self.quant_map}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.dtype_name, "shape": list(self.shape)}
        if self.double_quant:
            entries[".nested_absmax"] = self.nested_absmax
            entries[".nested_quant_map"] = self.nested_map
            meta.update(nested_blocksize=nf4_core.NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.offset))
        entries["." + STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return entries

    @staticmethod
    def state_from_entries(entries: dict[str, torch.Tensor], where: str) -> dict:
        """Parse bitsandbytes' serialised state (suffixes as in state_entries); errors name ``where``."""
        keys = [k for k in entries if k.startswith(".quant_state.")]
        if not keys:
            raise LorakernError(f"{where}: no '.quant_state.bitsandbytes__*' entry; this is not a bitsandbytes 4-bit "
                             f"state dict (keys found: {sorted(entries)})")
        quant_type = keys[0].rsplit("__", 1)[-1]
        meta = json.loads(bytes(entries[keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
        if quant_type != "nf4" or meta.get("quant_type", quant_type) != "nf4":
            raise LorakernError(f"{where}: found quant_type {meta.get('quant_type', quant_type)!r} where NF4 was asked "
                             f"for; lorakern reads NF4 states only (re-quantize with quant_type='nf4')")
        missing = [k for k in ("", ".absmax") if k not in entries]
        if missing:
            raise LorakernError(f"{where}: the bitsandbytes state lacks {['weight' + k for k in missing]}")
        state = {"packed": entries[""].view(torch.uint8).reshape(-1, 1), "shape": tuple(meta["shape"]),
                 "dtype": meta["dtype"], "blocksize": int(meta["blocksize"]), "absmax": entries[".absmax"],
                 "quant_map": entries.get(".quant_map", torch.from_numpy(nf4_core.NF4_CODE.copy()))}
        if ".nested_absmax" in entries:
            state.update(nested_absmax=entries[".nested_absmax"],
                         nested_map=entries.get(".nested_quant_map", torch.from_numpy(nf4_core.NESTED_MAP.copy())),
                         offset=torch.tensor(meta["nested_offset"], dtype=torch.float32))
        return state


def _entries(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    base = prefix + "weight"
    return {k[len(base):]: v for k, v in state_dict.items() if k == base or k.startswith(base + ".")}

"""NF4 storage for torch: 4-bit frozen base weights for LoraLinear (QLoRA) and plain frozen layers.

The packed weight and its statistics are buffers (they move with ``.to()`` and live in ``state_dict``)
in bitsandbytes' layout. With ``quant_storage`` set to a float dtype (bitsandbytes' option of that name)
the packed bytes are instead held, bit for bit, in a frozen float Parameter, so that FSDP2's
``fully_shard`` shards them like any weight; ``NF4Storage.packed`` always reads them back as uint8.
``state_dict`` uses the keys transformers + bitsandbytes write for a
``Params4bit`` (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so either side loads the other.

The quantizer mirrors lorakern.core.nf4 operation by operation in torch (fast, on any device; the
double quantization's offset is torch's own ``mean`` as in bitsandbytes). The CPU path multiplies by
the weight dequantized in chunks of rows, forward and backward, and never keeps a full-precision copy.
"""
from __future__ import annotations

import json
import math
from typing import Optional, Union

import torch
from torch import nn

from lorakern import native
from lorakern.core import nf4 as nf4_core
from lorakern.functional import resolve_backend, torch_dropout_mask
from lorakern.layer import LoraLinear, is_conv1d, is_linear_like

QUANT_TYPES = ("nf4",)
STATE_KEY = "quant_state.bitsandbytes__nf4"
# Rows of a weight dequantized at once on the torch path: at most this many elements per chunk.
CHUNK_ELEMENTS = 1 << 24
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What holds the packed bytes: "uint8" a buffer (replicated by DDP and FSDP), a float dtype a frozen
# Parameter holding the same bytes reinterpreted (FSDP2 shards Parameters only, along dim 0).
QUANT_STORAGES = {"uint8": torch.uint8, **_DTYPES}


def quant_storage_name(value: Union[str, torch.dtype]) -> str:
    """The name in QUANT_STORAGES of ``value`` (a name or a torch dtype, as bitsandbytes takes it)."""
    for name, dtype in QUANT_STORAGES.items():
        if value == name or value == dtype:
            return name
    raise ValueError(f"quant_storage={value!r} is not supported; use 'uint8' (a buffer, replicated under FSDP) or "
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


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"NF4 base weights are float32, float16 or bfloat16, got {dtype}; cast the layer first")


def _blockwise(flat: torch.Tensor, blocksize: int, midpoints: torch.Tensor, pack: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakern.core.nf4._blockwise_codes in torch: (uint8 codes, or NF4-packed bytes, and fp32 absmax per block).

    On CPU the compiled codec (lorakern.native) does the same arithmetic in one pass when it is available.
    """
    n = flat.numel()
    library = native.library() if flat.device.type == "cpu" else None
    if library is not None:
        flat = flat.contiguous()
        midpoints = midpoints.contiguous()
        out = torch.empty((n + 1) // 2 if pack else n, dtype=torch.uint8)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
        library.blockwise_quantize_f32(flat.data_ptr(), n, blocksize, midpoints.data_ptr(), midpoints.numel(),
                                       int(pack), out.data_ptr(), absmax.data_ptr())
        return (out.reshape(-1, 1) if pack else out), absmax
    full = n - n % blocksize
    tiny = torch.tensor(1e-38, dtype=torch.float32, device=flat.device)
    scaled = torch.empty_like(flat)
    absmax = flat[:full].abs().reshape(-1, blocksize).amax(dim=1)
    if full:
        inverse = 1.0 / torch.maximum(absmax, tiny)
        scaled[:full] = (flat[:full].reshape(-1, blocksize) * inverse[:, None]).reshape(-1)
    if n > full:
        last = torch.maximum(flat[full:].abs().amax(), tiny)
        scaled[full:] = flat[full:] / last
        absmax = torch.cat([absmax, last.reshape(1)])
    scaled.clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    if not pack:
        return codes, absmax
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1), absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Quantize ``weight`` to NF4 on its own device. Returns the buffers and metadata of the state."""
    nf4_core.check_blocksize(blocksize)
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point weights, got dtype {weight.dtype}; cast the weight to float first")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
    device = weight.device
    flat = weight.detach().reshape(-1).to(torch.float32)
    packed, absmax = _blockwise(flat, blocksize, torch.from_numpy(nf4_core.NF4_MIDPOINTS).to(device), pack=True)
    state = {"packed": packed, "shape": tuple(weight.shape), "dtype": _dtype_name(weight.dtype),
             "blocksize": blocksize, "quant_map": torch.from_numpy(nf4_core.NF4_CODE.copy()).to(device)}
    if not double_quant:
        state["absmax"] = absmax
        return state
    offset = absmax.mean()
    nested_map = torch.from_numpy(nf4_core.NESTED_MAP.copy()).to(device)
    nested_midpoints = (nested_map[:-1] + nested_map[1:]) / 2
    absmax_codes, nested_absmax = _blockwise(absmax - offset, nf4_core.NESTED_BLOCKSIZE, nested_midpoints, pack=False)
    state.update(absmax=absmax_codes, nested_absmax=nested_absmax, nested_map=nested_map, offset=offset)
    return state


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
            raise ValueError(f"the NF4 state's packed codes are {packed.dtype}, expected uint8; view them with "
                             f".view(torch.uint8) (quant_storage applies when building the storage)")
        if self.quant_storage == "uint8":
            self.register_buffer("packed_storage", packed)
        else:
            if packed.numel() != (self.numel + 1) // 2:
                raise ValueError(f"NF4 state does not fit a {self.shape} weight: packed has {packed.numel()} bytes, "
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
            raise ValueError(f"the packed NF4 bytes were cast from {expected} to {stored.dtype} (a MixedPrecisionPolicy "
                             f"param_dtype, or a .to() that bypassed NF4Storage); build the model with "
                             f"quant_storage={str(stored.dtype).replace('torch.', '')!r} to match param_dtype")
        if _is_dtensor(stored):
            raise ValueError(f"the packed NF4 bytes of this {self.shape} weight are sharded by FSDP2 (a DTensor of "
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
                raise ValueError(f"NF4 state does not fit a {self.shape} weight at blocksize {self.blocksize}: {name} "
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
        library = native.library() if whole.device.type == "cpu" and start % 2 == 0 else None
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
            raise ValueError(f"{where}: no '.quant_state.bitsandbytes__*' entry; this is not a bitsandbytes 4-bit "
                             f"state dict (keys found: {sorted(entries)})")
        quant_type = keys[0].rsplit("__", 1)[-1]
        meta = json.loads(bytes(entries[keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
        if quant_type != "nf4" or meta.get("quant_type", quant_type) != "nf4":
            raise ValueError(f"{where}: found quant_type {meta.get('quant_type', quant_type)!r} where NF4 was asked "
                             f"for; lorakern reads NF4 states only (re-quantize with quant_type='nf4')")
        missing = [k for k in ("", ".absmax") if k not in entries]
        if missing:
            raise ValueError(f"{where}: the bitsandbytes state lacks {['weight' + k for k in missing]}")
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


class _NF4Module:
    """State-dict handling shared by the 4-bit modules: the weight's entries under bitsandbytes' keys."""

    def _save_nf4(self, destination, prefix, keep_vars) -> None:
        for suffix, tensor in self.nf4.state_entries().items():
            destination[prefix + "weight" + suffix] = tensor if keep_vars else tensor.detach()

    def _load_nf4(self, state_dict, prefix, missing_keys, error_msgs) -> None:
        entries = _entries(state_dict, prefix)
        for key in list(entries):
            state_dict.pop(prefix + "weight" + key)
        if not entries:
            missing_keys.append(prefix + "weight")
            return
        try:
            state = NF4Storage.state_from_entries(entries, where=prefix + "weight")
            if state["blocksize"] != self.nf4.blocksize or state["shape"] != self.nf4.shape:
                raise ValueError(f"{prefix}weight: found blocksize {state['blocksize']} and shape {state['shape']}, "
                                 f"the layer holds blocksize {self.nf4.blocksize} and shape {self.nf4.shape}; "
                                 f"build the layer with the state's blocksize")
            if _is_dtensor(self.nf4.packed_storage):
                raise ValueError(f"{prefix}weight: the packed NF4 bytes are sharded by FSDP2; load the state dict "
                                 f"into the model before fully_shard")
            device = self.nf4.packed_storage.device
            self.nf4 = NF4Storage({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()},
                                  self.nf4.quant_storage)
        except ValueError as exc:
            error_msgs.append(str(exc))


class LinearNF4(_NF4Module, nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4; computes in ``compute_dtype``."""

    def __init__(self, storage: NF4Storage, bias: Optional[nn.Parameter], compute_dtype: Optional[torch.dtype] = None
                 ) -> None:
        super().__init__()
        self.nf4 = storage
        self.out_features, self.in_features = storage.shape
        self.bias = bias
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, quant_storage: Union[str, torch.dtype] = "uint8"
                    ) -> "LinearNF4":
        if not is_linear_like(linear):
            raise TypeError(f"from_linear takes an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        weight = linear.weight.t() if is_conv1d(linear) else linear.weight
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return cls(NF4Storage(quantize_nf4(weight, blocksize, double_quant), quant_storage), bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.nf4, self.bias, None, None, 0.0, self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_nf4(destination, prefix, keep_vars)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_nf4(state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantized_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.nf4.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.nf4.blocksize}, double_quant={self.nf4.double_quant}")


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b + s u B^T with W decoded from NF4 chunk by chunk, u = x~ A^T.

    Backward, with g = dL/dy (M, N), W decoded again chunk by chunk (never stored whole):
        dx  = sum over row chunks c of g[:, c] W[c]  +  s (g B) A       (the LoRA part through the mask)
        dA  = s (g B)^T x~,   dB = s g^T u,   db = sum_rows g
    Saved: x~ (the LoRA input) and u; the 4-bit storage is referenced, not copied.
    """

    @staticmethod
    def forward(ctx, x, x_lora, storage, bias, lora_A, lora_B, scaling):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        out_features = storage.shape[0]
        # Allocated in the output's shape and filled through a 2-D view: a returned view (y.reshape) would
        # make FSDP2 warn that an in-place op on the output skips its pre-backward all-gather.
        out = x2.new_empty(*x.shape[:-1], out_features)
        y = out.view(-1, out_features)
        for r0, chunk in storage.row_chunks(x2.dtype):
            rows = slice(r0, r0 + chunk.shape[0])
            target = y if chunk.shape[0] == out_features else y[:, rows]
            # y[:, rows] = x W[rows]^T (+ b[rows])
            if bias is None:
                torch.mm(x2, chunk.t(), out=target)
            else:
                torch.addmm(bias[rows], x2, chunk.t(), out=target)
        u = None
        has_lora = lora_A is not None
        if has_lora:
            xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_features)
            u = xl2 @ lora_A.t()
            y.addmm_(u, lora_B.t(), alpha=scaling)
        ctx.storage, ctx.scaling, ctx.x_shape = storage, scaling, x.shape
        ctx.has_lora, ctx.lora_separate, ctx.has_bias = has_lora, x_lora is not None, bias is not None
        ctx.save_for_backward((xl2 if has_lora else None), u, lora_A, lora_B)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, u, lora_A, lora_B = ctx.saved_tensors
        need_x, need_xl, _, need_b, need_A, need_B, _ = ctx.needs_input_grad
        storage, s = ctx.storage, ctx.scaling
        g = grad_y.reshape(-1, storage.shape[0])
        dx = dxl = db = dA = dB = None
        gB = g @ lora_B if ctx.has_lora and (need_A or need_xl or (need_x and not ctx.lora_separate)) else None
        if need_x:
            dx = g.new_zeros(g.shape[0], storage.shape[1])
            for r0, chunk in storage.row_chunks(g.dtype):
                # dx += g[:, c] W[c]
                dx.addmm_(g[:, r0:r0 + chunk.shape[0]], chunk)
            if gB is not None and not ctx.lora_separate:
                dx.addmm_(gB, lora_A, alpha=s)
            dx = dx.reshape(ctx.x_shape)
        if need_xl:
            dxl = torch.addmm(g.new_empty(g.shape[0], lora_A.shape[1]), gB, lora_A, beta=0, alpha=s).reshape(ctx.x_shape)
        if need_A:
            dA = torch.addmm(lora_A.new_empty(lora_A.shape), gB.t(), x_lora, beta=0, alpha=s)
        if need_B:
            dB = torch.addmm(lora_B.new_empty(lora_B.shape), g.t(), u, beta=0, alpha=s)
        if need_b and ctx.has_bias:
            db = g.sum(dim=0)
        return dx, dxl, None, db, dA, dB, None


def nf4_linear(x: torch.Tensor, storage: NF4Storage, bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
               lora_B: Optional[torch.Tensor], scaling: float, compute_dtype: Optional[torch.dtype] = None,
               dropout_p: float = 0.0, seed: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """x W^T + b (+ s (x~ A^T) B^T) with W in NF4, computed in ``compute_dtype``, returned in x's dtype.

    With LoRA, the backend switch applies as for LoraLinear: the Triton kernels decode W tile by tile
    inside the GEMM (auto on CUDA); the torch path decodes it in chunks of rows.
    """
    out_features, in_features = storage.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input has shape {tuple(x.shape)} but this layer takes in_features={in_features} in the "
                         f"last dimension; reshape the input to (..., {in_features})")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; cast it with x.float()")
    if x.device != storage.packed.device:
        raise ValueError(f"input is on {x.device} but the 4-bit weight is on {storage.packed.device}; move the input "
                         f"or the layer (layer.to({str(x.device)!r})) so they share a device")
    dtype = compute_dtype or (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                              else x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if lora_A is not None:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
            triton = resolve_backend(xc, storage, lora_A, backend).name == "triton"
            if dropout_p > 0 and seed is None:
                # the kernels take the seed as a 0-d tensor, which torch.compile traces (.item() breaks the graph)
                seed = torch.randint(0, 2**31 - 1, ())
                seed = seed if triton else int(seed.item())
            if triton:
                from lorakern.kernels.lora_linear import lora_linear_triton

                y = lora_linear_triton(xc, storage, bias, lora_A, lora_B, scaling, dropout_p, 0 if seed is None else seed)
                return y.to(x.dtype) if compute_dtype is not None else y
        x_lora = None
        if lora_A is not None and dropout_p > 0:
            x_lora = xc * torch_dropout_mask(seed, x.shape, dropout_p, x.device).to(dtype)
        y = NF4LinearFunction.apply(xc, x_lora, storage, bias, lora_A, lora_B, scaling)
    return y.to(x.dtype) if compute_dtype is not None else y


class LoraLinearNF4(_NF4Module, LoraLinear):
    """LoraLinear on a frozen NF4 base weight (QLoRA). LoRA parameters stay in full precision.

    Build it with ``LoraLinear.from_linear(linear, quantize="nf4", ...)`` or ``LoraLinearNF4.from_linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, lora_dtype: torch.dtype = torch.float32,
                    quant_storage: Union[str, torch.dtype] = "uint8", **lora_kwargs) -> "LoraLinearNF4":
        if not is_linear_like(linear):
            raise TypeError(f"from_linear takes an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        conv = is_conv1d(linear)
        weight = linear.weight.t() if conv else linear.weight
        out_features, in_features = weight.shape
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias=linear.bias is not None, dtype=lora_dtype, **lora_kwargs)
        del layer.weight
        layer.nf4 = NF4Storage(quantize_nf4(weight, blocksize, double_quant), quant_storage)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        device = weight.device
        layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, dtype=lora_dtype, device=device))
        layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, dtype=lora_dtype, device=device))
        layer.reset_lora_parameters()
        layer.compute_dtype = compute_dtype
        layer._base_type = type(linear)
        return layer

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The base weight decoded to the compute dtype (a new tensor: for tests and merging only)."""
        return self.nf4.dequantize(self.compute_dtype or _DTYPES[self.nf4.dtype_name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return nf4_linear(x, self.nf4, self.bias, None, None, 0.0, self.compute_dtype)
        return nf4_linear(x, self.nf4, self.bias, self.lora_A, self.lora_B, self.scaling, self.compute_dtype,
                          dropout_p=self.dropout if self.training else 0.0, seed=self.dropout_seed,
                          backend=self.backend)

    def dropout_mask(self, seed: int, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype or x.dtype)
        backend = resolve_backend(xc, self.nf4, self.lora_A.to(xc.dtype), self.backend)
        return backend.dropout_mask(seed, x.shape, self.dropout, x.device)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merge(self, safe: bool = True) -> None:
        raise ValueError("a 4-bit base weight cannot absorb the update without requantizing; use "
                         "lorakern.merge_and_unload(model) for full-precision layers (requantize=True to go back to 4 bits)")

    def unmerge(self) -> None:
        raise ValueError("a 4-bit layer is never merged; nothing to unmerge")

    def merged_weight(self) -> torch.Tensor:
        """W (decoded, fp32) + s B A, in the original weight's dtype."""
        merged = self.nf4.dequantize(torch.float32) + self.delta_weight()
        return merged.to(_DTYPES[self.nf4.dtype_name])

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def unload(self) -> nn.Module:
        """The frozen 4-bit base layer alone (the adapter dropped), sharing this layer's storage."""
        return LinearNF4(self.nf4, self.bias, self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_nf4(destination, prefix, keep_vars)
        for name in ("bias", "lora_A", "lora_B"):
            value = getattr(self, name)
            if value is not None:
                destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_nf4(state_dict, prefix, missing_keys, error_msgs)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nf4 blocksize={self.nf4.blocksize}, double_quant={self.nf4.double_quant}"


def requantize(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
               compute_dtype: Optional[torch.dtype] = None, quant_storage: Union[str, torch.dtype] = "uint8"
               ) -> tuple[LinearNF4, dict]:
    """(a LinearNF4 of ``linear``, the error that quantization added: max abs and RMS, absolute and relative)."""
    layer = LinearNF4.from_linear(linear, blocksize, double_quant, compute_dtype, quant_storage)
    error = layer.nf4.dequantize(torch.float32) - linear.weight.detach().float()
    scale = linear.weight.detach().float().abs().max().clamp_min(1e-30)
    report = {"max_abs": float(error.abs().max()), "rms": float(error.pow(2).mean().sqrt()),
              "max_rel": float(error.abs().max() / scale)}
    return layer, report


def quantized_bytes_per_weight(module: nn.Module) -> float:
    """Bytes of NF4 storage per quantized weight across ``module`` (0.5625 plain, ~0.516 double-quantized)."""
    storages = [m for m in module.modules() if isinstance(m, NF4Storage)]
    if not storages:
        raise ValueError(f"{type(module).__name__} holds no NF4 weights")
    return sum(s.nbytes() for s in storages) / sum(s.numel for s in storages)


__all__ = ["LinearNF4", "LoraLinearNF4", "NF4Storage", "QUANT_STORAGES", "nf4_linear", "quant_storage_name",
           "quantize_nf4", "quantized_bytes_per_weight", "requantize"]

"""NF4 quantization in torch: bitsandbytes' NF4, bit for bit, on any device.

The quantizer mirrors lorakern.core.nf4 operation by operation (fast, on any device; the double
quantization's offset is torch's own ``mean`` as in bitsandbytes). On the CPU the compiled codec
(lorakern.native) does the same arithmetic in one pass when it is available.
"""
from __future__ import annotations

import torch

from lorakern import native
from lorakern.core import nf4 as nf4_core
from lorakern.errors import LorakernError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise LorakernError(f"NF4 base weights are float32, float16 or bfloat16, got {dtype}; cast the layer first")


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
        raise LorakernError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}: NF4 needs at least one "
                            f"element; leave this layer out of quantization (quantize_skip) or give it a real weight")
    bad = ~torch.isfinite(weight.detach())
    if bad.any():
        first = tuple(int(i) for i in torch.unravel_index(bad.reshape(-1).int().argmax(), weight.shape))
        raise LorakernError(nf4_core.non_finite_message(int(bad.sum()), first, float(weight.detach()[first]),
                                                        tuple(weight.shape)))
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

"""The NF4 codec in NumPy, bit-identical to bitsandbytes (see shared/formats.md).

A weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (the last one
may be partial). Each block keeps its absmax (fp32); each element becomes the index of the nearest of
the 16 NF4 code values after division by the absmax, decided by the midpoints between codes (a value
exactly on a midpoint takes the lower code). Two indices share a byte, the first in the high nibble.

Double quantization stores the absmaxes themselves in 8 bits: ``offset = mean(absmax)``, and
``absmax - offset`` is quantized in blocks of 256 with bitsandbytes' signed dynamic map by the same
blockwise routine (midpoints of the map), keeping one fp32 absmax per 256 blocks. Decoding:
``absmax = map[q] * nested_absmax[i // 256] + offset``, then ``w = NF4[q] * absmax``, all in fp32.

The arithmetic mirrors bitsandbytes' pure-PyTorch backend (backends/default/ops.py) operation by
operation, so every code and absmax matches it bit for bit. Two caveats, both pinned by tests:
- torch computes ``mean(absmax)`` with a vectorised summation whose last bit depends on the CPU; here
  it is the correctly rounded mean, and ``offset=`` takes the one another implementation used (the
  torch side of lorakern passes torch's own mean, so it matches bitsandbytes on the same machine);
- when bitsandbytes' native CPU library is loaded, its 8-bit quantizer (used for the double
  quantization only) searches the map through a lookup table that picks a neighbouring entry for a
  few values in a thousand. Its states decode exactly here all the same: decoding takes any codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
# Midpoints between adjacent codes, computed in fp32 as bitsandbytes does.
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4",)
DTYPES = ("float32", "float16", "bfloat16")


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32): start + step*i (end - step*(steps-1-i) past
    halfway), each rounded once."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    low = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit map (create_dynamic_map), 256 sorted fp32 values."""
    data: list = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = _linspace32(0.1, 1.0, int(items))
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        values = (np.float32(10.0 ** (-(max_exponent_bits - 1) + i)) * means).astype(np.float32)
        data.extend(values)
        if signed:
            data.extend(-values)
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.array(data, dtype=np.float32))


NESTED_MAP = dynamic_map(signed=True)


@dataclass
class NF4State:
    """A weight in NF4: the packed codes and everything needed to decode them.

    packed: uint8 (ceil(n / 2), 1); shape / dtype: the original weight's; absmax: fp32 per block, or
    with double quantization absmax_codes (uint8 per block), nested_absmax (fp32 per 256 blocks),
    nested_map (256 fp32) and offset (fp32).
    """

    packed: np.ndarray
    shape: tuple
    dtype: str
    blocksize: int
    absmax: Optional[np.ndarray] = None
    absmax_codes: Optional[np.ndarray] = None
    nested_absmax: Optional[np.ndarray] = None
    nested_map: Optional[np.ndarray] = None
    offset: Optional[np.float32] = None
    quant_type: str = "nf4"
    nested_blocksize: int = NESTED_BLOCKSIZE
    code: np.ndarray = field(default_factory=lambda: NF4_CODE.copy())

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus the block statistics."""
        arrays = [self.packed, self.absmax, self.absmax_codes, self.nested_absmax]
        return sum(a.nbytes for a in arrays if a is not None) + (4 if self.offset is not None else 0)

    def absmax_values(self) -> np.ndarray:
        """The per-block absmax in fp32, decoded from the double quantization when there is one."""
        self.validate()
        if not self.double_quant:
            return self.absmax
        nested = self.nested_absmax[np.arange(self.blocks) // self.nested_blocksize]
        return (self.nested_map[self.absmax_codes.astype(np.int64)] * nested + np.float32(self.offset)).astype(np.float32)

    def validate(self) -> None:
        """Raise ValueError when the arrays do not fit the shape and blocksize."""
        check_blocksize(self.blocksize)
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type {self.quant_type!r} is not supported; lorakern reads {QUANT_TYPES}")
        n = self.numel
        expected = {"packed": ((n + 1) // 2, 1)}
        if self.double_quant:
            expected.update(absmax_codes=(self.blocks,), nested_absmax=(-(-self.blocks // self.nested_blocksize),),
                            nested_map=(256,))
        else:
            expected.update(absmax=(self.blocks,))
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is None or tuple(value.shape) != shape:
                found = None if value is None else tuple(value.shape)
                raise ValueError(
                    f"NF4 state does not fit a {tuple(self.shape)} weight at blocksize {self.blocksize}: {name} has "
                    f"shape {found}, expected {shape}; the state belongs to another weight or blocksize"
                )


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not allowed; use one of {BLOCKSIZES} (64 is bitsandbytes' default)")


def non_finite_message(count: int, first: tuple, value: float, shape: tuple) -> str:
    """The refusal of a weight holding NaN or inf (shared with the torch quantizer)."""
    return (f"cannot quantize a weight of shape {tuple(shape)} holding NaN or inf: {count} non-finite element"
            f"{'s' if count != 1 else ''}, the first at index {tuple(first)} ({value}); a block's absmax would be "
            f"NaN or inf and decode the whole block to NaN. Find where the weight diverged, or replace them "
            f"(e.g. torch.nan_to_num) before quantizing")


def _as_float32(w) -> np.ndarray:
    array = np.asarray(w)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"NF4 quantizes floating-point weights, got dtype {array.dtype}; cast the weight to float first")
    if array.size == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {array.shape}: NF4 needs at least one element; "
                         f"leave this layer out of quantization or give it a real weight")
    bad = ~np.isfinite(array)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), array.shape)
        raise ValueError(non_finite_message(int(bad.sum()), tuple(int(i) for i in first), float(array[first]),
                                            array.shape))
    return array.astype(np.float32, copy=False).reshape(-1)


def _blockwise_codes(flat: np.ndarray, blocksize: int, midpoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index per element into a sorted code, absmax per block): bitsandbytes' blockwise routine.

    Full blocks: clamp(x * fl(1 / max(absmax, 1e-38)), -1, 1); a partial last block: x / its absmax
    (whose stored value is clamped to at least 1e-38). Then the code whose midpoint interval holds
    the value, a value exactly on a midpoint taking the lower code.
    """
    n = flat.size
    full = n - n % blocksize
    tiny = np.float32(1e-38)
    scaled = np.empty_like(flat)
    absmax = np.abs(flat[:full]).reshape(-1, blocksize).max(axis=1) if full else np.zeros(0, np.float32)
    if full:
        inverse = (np.float32(1.0) / np.maximum(absmax, tiny)).astype(np.float32)
        scaled[:full] = (flat[:full].reshape(-1, blocksize) * inverse[:, None]).reshape(-1)
    if n > full:
        last = np.maximum(np.abs(flat[full:]).max(), tiny)
        scaled[full:] = flat[full:] / last
        absmax = np.concatenate([absmax, [last]])
    np.clip(scaled, -1.0, 1.0, out=scaled)
    return np.searchsorted(midpoints, scaled, side="left"), absmax.astype(np.float32)


def quantize_codes(w, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(NF4 index per element as uint8, fp32 absmax per block) of ``w`` flattened row-major."""
    codes, absmax = _blockwise_codes(_as_float32(w), blocksize, NF4_MIDPOINTS)
    return codes.astype(np.uint8), absmax


def pack(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count is padded with code 7 (zero)."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([7], dtype=np.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8).reshape(-1, 1)


def unpack(packed: np.ndarray, numel: int) -> np.ndarray:
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    codes = np.empty(flat.size * 2, dtype=np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0xF
    return codes[:numel]


def quantize_blockwise_8bit(values, code: np.ndarray = NESTED_MAP, blocksize: int = NESTED_BLOCKSIZE
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 index per value, fp32 absmax per block): 8-bit blockwise quantization with a sorted map."""
    midpoints = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    codes, absmax = _blockwise_codes(np.asarray(values, dtype=np.float32).reshape(-1), blocksize, midpoints)
    return codes.astype(np.uint8), absmax


def nf4_quantize(w, blocksize: int = 64, double_quant: bool = True, offset: Optional[float] = None,
                 dtype: Optional[str] = None) -> NF4State:
    """Quantize ``w`` (any shape) to NF4 as bitsandbytes' quantize_4bit(quant_type="nf4") does.

    ``offset`` (double quantization only) overrides the mean of the absmaxes; ``dtype`` records the
    original dtype's name (e.g. "bfloat16", which NumPy has not) for decoding.
    """
    check_blocksize(blocksize)
    array = np.asarray(w)
    _as_float32(array)
    name = dtype or str(array.dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} cannot be recorded; use one of {DTYPES}")
    codes, absmax = quantize_codes(array, blocksize)
    state = NF4State(packed=pack(codes), shape=tuple(array.shape), dtype=name, blocksize=blocksize)
    if not double_quant:
        state.absmax = absmax
        return state
    mean = np.float32(np.mean(absmax, dtype=np.float64)) if offset is None else np.float32(offset)
    state.absmax_codes, state.nested_absmax = quantize_blockwise_8bit((absmax - mean).astype(np.float32))
    state.nested_map = NESTED_MAP.copy()
    state.offset = mean
    return state


def nf4_dequantize(state: NF4State) -> np.ndarray:
    """The fp32 weight: NF4[q] * absmax of its block, in the original shape."""
    absmax = state.absmax_values()
    n = state.numel
    codes = unpack(state.packed, n)
    values = state.code[codes.astype(np.int64)] * np.repeat(absmax, state.blocksize)[:n]
    return values.astype(np.float32).reshape(state.shape)

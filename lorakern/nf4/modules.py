"""The 4-bit modules: the chunked-decode autograd Function (the torch path of an NF4 base) and LinearNF4,
a frozen nn.Linear stored in NF4 (the layers QLoRA leaves without an adapter).

The CPU path multiplies by the weight dequantized in chunks of rows, forward and backward, and never
keeps a full-precision copy. LoRA layers on an NF4 base are ``lorakern.LoraLinear`` with an NF4 base
(lorakern.bases); they reach NF4LinearFunction through lorakern.dispatch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lorakern.errors import LorakernError
from lorakern.linear_like import is_conv1d, is_linear_like
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.storage import NF4Storage, _is_dtensor


def _entries(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    base = prefix + "weight"
    return {k[len(base):]: v for k, v in state_dict.items() if k == base or k.startswith(base + ".")}


def save_nf4_entries(storage: NF4Storage, destination: dict, prefix: str, keep_vars: bool) -> None:
    """Write ``storage`` into a state dict under bitsandbytes' keys (``<prefix>weight``, ``...weight.absmax``, ...)."""
    for suffix, tensor in storage.state_entries().items():
        destination[prefix + "weight" + suffix] = tensor if keep_vars else tensor.detach()


def load_nf4_entries(owner: nn.Module, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list) -> None:
    """Read bitsandbytes' keys under ``prefix`` into ``owner.nf4`` (a new NF4Storage), popping them from
    ``state_dict``; problems go to ``error_msgs`` as load_state_dict expects."""
    entries = _entries(state_dict, prefix)
    for key in list(entries):
        state_dict.pop(prefix + "weight" + key)
    if not entries:
        missing_keys.append(prefix + "weight")
        return
    current = owner.nf4
    try:
        state = NF4Storage.state_from_entries(entries, where=prefix + "weight")
        if state["blocksize"] != current.blocksize or state["shape"] != current.shape:
            raise LorakernError(f"{prefix}weight: found blocksize {state['blocksize']} and shape {state['shape']}, "
                                f"the layer holds blocksize {current.blocksize} and shape {current.shape}; "
                                f"build the layer with the state's blocksize")
        if _is_dtensor(current.packed_storage):
            raise LorakernError(f"{prefix}weight: the packed NF4 bytes are sharded by FSDP2; load the state dict "
                                f"into the model before fully_shard")
        device = current.packed_storage.device
        owner.nf4 = NF4Storage({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()},
                               current.quant_storage)
    except ValueError as exc:
        error_msgs.append(str(exc))


class LinearNF4(nn.Module):
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
        return nf4_linear(x, self.nf4, self.bias, self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save_nf4_entries(self.nf4, destination, prefix, keep_vars)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_nf4_entries(self, state_dict, prefix, missing_keys, error_msgs)
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
        # The forward ran with autocast off (lora_forward, nf4_linear). A backward called inside an autocast
        # region (loss.backward() in the `with` block) would otherwise recast g @ B to autocast's dtype,
        # which then meets A in the compute dtype.
        with torch.autocast(grad_y.device.type, enabled=False):
            return NF4LinearFunction._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
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


def requantize(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
               compute_dtype: Optional[torch.dtype] = None, quant_storage: Union[str, torch.dtype] = "uint8"
               ) -> tuple[LinearNF4, dict]:
    """(a LinearNF4 of ``linear``, the error that quantization added: max abs and RMS, absolute and relative)."""
    layer = LinearNF4.from_linear(linear, blocksize, double_quant, compute_dtype, quant_storage)
    return layer, quantization_error(layer.nf4, linear.weight.detach().float())


def quantization_error(storage: NF4Storage, original: torch.Tensor) -> dict:
    """What quantizing ``original`` (out, in) to ``storage`` changed: max abs and RMS error, and the max
    error relative to the largest |w|."""
    error = storage.dequantize(torch.float32) - original.float()
    scale = original.float().abs().max().clamp_min(1e-30)
    return {"max_abs": float(error.abs().max()), "rms": float(error.pow(2).mean().sqrt()),
            "max_rel": float(error.abs().max() / scale)}


def quantized_bytes_per_weight(module: nn.Module) -> float:
    """Bytes of NF4 storage per quantized weight across ``module`` (0.5625 plain, ~0.516 double-quantized)."""
    storages = [m for m in module.modules() if isinstance(m, NF4Storage)]
    if not storages:
        raise ValueError(f"{type(module).__name__} holds no NF4 weights")
    return sum(s.nbytes() for s in storages) / sum(s.numel for s in storages)


def check_nf4_input(x: torch.Tensor, storage: NF4Storage) -> None:
    out_features, in_features = storage.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise LorakernError(f"input has shape {tuple(x.shape)} but this layer takes in_features={in_features} in the "
                            f"last dimension; reshape the input to (..., {in_features})")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; cast it with x.float()")
    if x.device != storage.packed_storage.device:
        raise LorakernError(f"input is on {x.device} but the 4-bit weight is on {storage.packed_storage.device}; move "
                            f"the input or the layer (layer.to({str(x.device)!r})) so they share a device")


def nf4_compute_dtype(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a 4-bit layer computes in: its compute_dtype, else autocast's, else the input's."""
    if compute_dtype is not None:
        return compute_dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def nf4_linear(x: torch.Tensor, storage: NF4Storage, bias: Optional[torch.Tensor],
               compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x W^T + b with W in NF4 (no adapter), computed in ``compute_dtype``, returned in x's dtype when
    compute_dtype is set (bitsandbytes' Linear4bit does the same)."""
    check_nf4_input(x, storage)
    dtype = nf4_compute_dtype(x, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        y = NF4LinearFunction.apply(x.to(dtype), None, storage, None if bias is None else bias.to(dtype),
                                    None, None, 0.0)
    return y.to(x.dtype) if compute_dtype is not None else y

"""The torch implementation of a LoRA layer on an NF4 base (registered with lorakern.dispatch as
("torch", "nf4")): NF4LinearFunction decodes W in chunks of rows, forward and backward, and adds the
LoRA term with plain torch products."""
from __future__ import annotations

from typing import Optional

import torch

from lorakern import dispatch, mixed
from lorakern.dispatch import Call, Implementation
from lorakern.functional import _dropped_out, torch_dropout_mask
from lorakern.nf4.modules import NF4LinearFunction


def _run(call: Call):
    x_lora = _dropped_out(call.x, call.dropout_p, call.seed)
    return NF4LinearFunction.apply(call.x, x_lora, call.weight, call.bias, call.lora_A, call.lora_B, call.scaling)


def _unsupported(call: Call) -> Optional[str]:
    return None


def _base_output(call) -> torch.Tensor:
    return NF4LinearFunction.apply(call.x, None, call.weight, call.bias, None, None, 0.0)


dispatch.register(Implementation("torch", "nf4", _run, torch_dropout_mask, _unsupported,
                                 run_mixed=lambda call: mixed.run_torch(call, _base_output, torch_dropout_mask)))

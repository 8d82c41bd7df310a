"""Hugging Face ``transformers.Trainer``: write the LoRA adapter wherever Trainer saves.

Trainer saves an injected model as what it is, a ``PreTrainedModel``: ``save_model`` and every checkpoint
hold the full weights (``model.safetensors``), which Trainer itself needs for ``resume_from_checkpoint`` and
``load_best_model_at_end``. It knows adapters only of PEFT's own ``PeftModel``. ``SaveAdapterCallback``
adds lorakern's adapter, in PEFT's format, next to them:

    trainer = Trainer(model=inject(model, config), args=args, train_dataset=data,
                      callbacks=[SaveAdapterCallback()])

- at every save (``save_strategy`` / ``save_steps``): ``adapter_config.json`` + ``adapter_model.safetensors``
  in ``<output_dir>/checkpoint-<step>/``, which ``lorakern.load_adapter`` and
  ``peft.PeftModel.from_pretrained`` both read;
- at the end of training: the same two files in ``output_dir`` (or ``final_dir``), as PEFT's models leave
  them after ``trainer.save_model()``.

transformers is imported here only: ``import lorakern`` never needs it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("lorakern.integrations needs transformers; install it with pip install 'lorakern[harness]' "
                      "(the rest of lorakern works without it)") from exc

from lorakern.adapters import save_adapter


class SaveAdapterCallback(TrainerCallback):
    """Saves the model's LoRA adapter into each checkpoint folder Trainer writes, and at the end.

    final_dir: where the end-of-training adapter goes (default ``args.output_dir``); at_end=False skips it.
    Trainer calls callbacks on every process; ``save_adapter`` gathers sharded (FSDP2) tensors on all of
    them and writes on rank 0. Checkpoint folders are ``<args.output_dir>/checkpoint-<global_step>``, as
    Trainer names them outside hyperparameter search.
    """

    def __init__(self, final_dir: Optional[str] = None, at_end: bool = True) -> None:
        self.final_dir = final_dir
        self.at_end = at_end

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_adapter(_required(model, "on_save"), folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if self.at_end:
            save_adapter(_required(model, "on_train_end"), self.final_dir or args.output_dir)


def _required(model: Optional[nn.Module], event: str) -> nn.Module:
    if model is None:
        raise ValueError(f"SaveAdapterCallback.{event} got no model; pass it to Trainer(callbacks=[...]) so "
                         f"that Trainer hands its model to the callback")
    return model

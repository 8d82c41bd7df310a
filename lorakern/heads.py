"""The seed's task heads on a BERT-family encoder (see shared/seed.md).

Classification: the hidden state of the first token (<s>) -> LayerNorm -> dropout -> Linear(hidden, C).
"""
from __future__ import annotations

import torch
from torch import nn


class SeedClassificationHead(nn.Module):
    """LayerNorm -> dropout -> Linear on the first token's hidden state."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(hidden_states[:, 0])))


class SeedClassifier(nn.Module):
    """An encoder (e.g. transformers' RobertaModel) with the seed's classification head.

    ``config.num_labels`` is kept in step with the head, so adapters record the label count.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.roberta = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        eps = getattr(self.config, "layer_norm_eps", 1e-5)
        self.classifier = SeedClassificationHead(self.config.hidden_size, num_labels, dropout, eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden)

"""The seed's task heads on a BERT-family encoder (see shared/seed.md).

Classification: the hidden state of the first token (<s>) -> LayerNorm -> dropout -> Linear(hidden, C).
Regression (STS-B): the same head with one output, squashed to [0, 5] by sigmoid(x)·5.
Question answering (SQuAD): LayerNorm -> dropout -> Linear on every token, with outputs start and end,
and for v2.0 a third whose value at position 0 (<s>) is the no-answer logit.
"""
from __future__ import annotations

import torch
from torch import nn


class SeedTokenHead(nn.Module):
    """LayerNorm -> dropout -> Linear on every token's hidden state: (B, T, H) -> (B, T, C)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(hidden_states)))


class SeedClassificationHead(SeedTokenHead):
    """LayerNorm -> dropout -> Linear on the first token's hidden state: (B, T, H) -> (B, C)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states[:, 0])


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = _encode(self.roberta, input_ids, attention_mask, token_type_ids)
        return self.classifier(hidden)


class SeedRegressor(SeedClassifier):
    """The seed's STS-B model: one output, ``sigmoid(x) * scale`` (scale 5, the score range), shape (B,).

    Squashing keeps every prediction inside the label range; the seed trains it with plain MSE.
    """

    def __init__(self, encoder: nn.Module, scale: float = 5.0, dropout: float = 0.1) -> None:
        super().__init__(encoder, num_labels=1, dropout=dropout)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(super().forward(input_ids, attention_mask, token_type_ids)).squeeze(-1) * self.scale


class SeedQuestionAnswering(nn.Module):
    """The seed's SQuAD model: per-token logits (B, T, 2) — start, end — or (B, T, 3) with ``no_answer``.

    The third channel is read at position 0 only, as the no-answer logit (SQuAD v2.0). The head is named
    ``qa_outputs`` like transformers' QA models, so recipes and adapters name it the same way.
    """

    def __init__(self, encoder: nn.Module, no_answer: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.roberta = encoder
        self.config = encoder.config
        self.config.num_labels = 3 if no_answer else 2
        eps = getattr(self.config, "layer_norm_eps", 1e-5)
        self.qa_outputs = SeedTokenHead(self.config.hidden_size, self.config.num_labels, dropout, eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.qa_outputs(_encode(self.roberta, input_ids, attention_mask, token_type_ids))


def _encode(encoder: nn.Module, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
    kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    return encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

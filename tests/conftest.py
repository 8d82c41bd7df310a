import os
import sys

# Without CUDA the Triton kernels run under the interpreter, and TRITON_INTERPRET must be set before
# triton itself is first imported (by lorakern.kernels, or by bitsandbytes and transformers): triton's
# own library functions (tl.cdiv, tl.rand) are decorated at that moment.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomized set of examples; set LORAKERN_HYPOTHESIS=thorough for a longer hunt.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LORAKERN_HYPOTHESIS", "ci"))

# The repository root holds a folder named kernels/ (installed as lorakern.kernels). Keep the root off
# sys.path even under `python -m pytest`: bitsandbytes and transformers import any top-level `kernels`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_roberta_config(num_labels: int = 2, **overrides):
    from transformers import RobertaConfig

    fields = dict(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                  max_position_embeddings=40, type_vocab_size=1, num_labels=num_labels,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    return RobertaConfig(**fields)


def tiny_roberta_classifier(num_labels: int = 2, seed: int = 0):
    """transformers' RobertaForSequenceClassification from a config: random weights, no download."""
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels)).eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (3, 11), generator=gen)
    input_ids[:, 0] = 0
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}

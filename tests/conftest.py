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

# CI runs a fixed, derandomized set of examples; set LORAKERN_HYPOTHESIS=thorough for a longer hunt. 200 examples:
# hypothesis mutates each new example a few times, so its draws come in clumps, and at 60 examples 3 to 40% of
# seeds (30 per strategy, 2026-12-01) left some stated class of our strategies under its floor, most often without
# a single example; at 150 about 3%, at 200 none (docs/testing.md).
settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HYPOTHESIS_PROFILE = os.environ.get("LORAKERN_HYPOTHESIS", "ci")
settings.load_profile(HYPOTHESIS_PROFILE)


def _draw_without_local_constants() -> None:
    """Hypothesis (6.131 on) also draws, at 5% of its choices, literals it collects from every local module
    imported so far (ours: lorakern and the tests). CI's fixed examples would then move with an edit to any
    literal anywhere in the code, and with which test files were imported first (running one file alone would
    draw other examples than the whole suite). CI draws from the strategies alone; the thorough profile keeps
    hypothesis's constants for its longer hunt."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # a hypothesis that collects no local constants
        return
    if hasattr(providers, "_get_local_constants"):
        providers._get_local_constants = Constants  # an empty set of constants at every draw


if HYPOTHESIS_PROFILE == "ci":
    _draw_without_local_constants()

# The repository root holds a folder named kernels/ (installed as lorakern.kernels). Keep the root off
# sys.path even under `python -m pytest`: bitsandbytes and transformers import any top-level `kernels`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402


# Under pytest-xdist (`pytest -n auto`, the README's command) each worker takes an equal share of the cores for
# torch's threads, at least 2: the C passes split their rows over torch's thread count, and the tests of those
# splits need two threads. Without this every worker would start one thread per core of the machine.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(2, (os.cpu_count() or 2) // _XDIST_WORKERS))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest -n, each test module runs whole on one worker, so a module-scoped fixture is built once and
    not once per worker: the compile check of every kernel config (~4 CPU-minutes), the harness's trained
    models. Measured on 2 cores (2026-12-01): the suite in 9.0 min this way, 8.9 with xdist's default
    per-test spread, 15.3 on one process."""
    from xdist.scheduler import LoadScopeScheduling

    return LoadScopeScheduling(config, log)


# Triton is optional (the `triton` extra). Without it the tests that need it skip, saying so, and the rest
# run: whole modules that exist for the kernels (TRITON_ONLY_MODULES), and any other test or module that
# fails only because triton is missing: on `import triton` (a test importing lorakern.kernels.lora_linear),
# or on lorakern's ValueError for a requested triton backend; pytest.importorskip("triton") skips get the
# same reason. Checked here, after TRITON_INTERPRET is set above.
def _triton_import_error() -> "ImportError | None":
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return ModuleNotFoundError("No module named 'triton'", name="triton")
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # installed but broken: its tests skip too, with the error in the reason
        return exc
    return None


TRITON_ERROR = _triton_import_error()
TRITON_SKIP_REASON = ("needs triton, which is not importable here ({}); install it with "
                      "pip install 'lorakern[triton]'").format(TRITON_ERROR)
# Test modules that test the Triton kernels and nothing else (test_kernels_compiled.py runs them in a
# subprocess, so no ImportError reaches this process): skipped whole, without being imported.
TRITON_ONLY_MODULES = frozenset({"test_kernels_interpreted.py", "test_kernels_compiled.py", "test_kernels_mixed.py",
                                 "test_kernels_dora.py"})


def _needs_missing_triton(exc: "BaseException | None") -> bool:
    """True when ``exc`` (or an exception it was raised from) is the failed import of triton, or lorakern's
    refusal of a requested triton backend for want of it (a ValueError pointing at the triton extra)."""
    seen = set()
    while exc is not None and TRITON_ERROR is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError) and (
                (exc.name or "").split(".")[0] == "triton" or (type(exc), str(exc)) == (type(TRITON_ERROR), str(TRITON_ERROR))):
            return True
        if isinstance(exc, ValueError) and "lorakern[triton]" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _TritonOptionalModule(pytest.Module):
    """A test module that skips, instead of failing to collect, where it needs the missing triton."""

    def collect(self):
        if self.path.name in TRITON_ONLY_MODULES:
            pytest.skip(TRITON_SKIP_REASON)
        try:
            return list(super().collect())
        except pytest.Collector.CollectError as exc:
            if _needs_missing_triton(exc.__cause__):
                pytest.skip(TRITON_SKIP_REASON)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    if TRITON_ERROR is not None:
        return _TritonOptionalModule.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped for triton is reported at its own path (not at the pytest.skip call above)."""
    outcome = yield
    report = outcome.get_result()
    if (isinstance(collector, _TritonOptionalModule) and report.skipped and isinstance(report.longrepr, tuple)
            and TRITON_SKIP_REASON in str(report.longrepr[2])):
        report.longrepr = (str(collector.path), 1, "Skipped: " + TRITON_SKIP_REASON)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without triton, a test that fails on importing it is reported skipped, and pytest.importorskip's
    skips of triton give the same reason as the rest."""
    outcome = yield
    report = outcome.get_result()
    if TRITON_ERROR is None:
        return
    if report.failed and call.excinfo is not None and _needs_missing_triton(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.reportinfo()[1] + 1, "Skipped: " + TRITON_SKIP_REASON)
    elif (report.skipped and isinstance(report.longrepr, tuple)
          and "could not import 'triton'" in str(report.longrepr[2])):
        report.longrepr = report.longrepr[:2] + ("Skipped: " + TRITON_SKIP_REASON,)


def tiny_roberta_config(num_labels: int = 2, **overrides):
    from transformers import RobertaConfig

    fields = dict(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                  max_position_embeddings=40, type_vocab_size=1, num_labels=num_labels,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    return RobertaConfig(**fields)


def save_no_dropout_roberta(folder: str, texts: list, max_length: int) -> str:
    """Write a local model folder: the harness's tiny RoBERTa (seed 0) with dropout 0, and its tokenizer
    built over ``texts`` for ``max_length`` tokens. Returns the folder."""
    from transformers import RobertaConfig, RobertaModel

    from lorakern.harness.models import TINY_SIZES, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(texts, max_length)
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length + 2, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **TINY_SIZES)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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

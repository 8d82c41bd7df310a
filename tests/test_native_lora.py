"""The C kernels for the rank-r products on CPU (lorakern/native/lora_cpu.c) against the float64 reference:
output and every gradient, odd shapes that hit the four-row and sixteen-lane tails, every subset of
gradients, and the cases that must fall back to the plain-torch formulation."""
import pytest
import torch

from lorakern import functional, native
from lorakern.testing import assert_matches_reference, compare_layer, random_layer


class _Spy:
    """Wraps the compiled library and counts the calls that reach it."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        function = getattr(self.library, name)

        def call(*args):
            self.calls.append(name)
            return function(*args)

        return call


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    library = native.lora_library()
    assert library is not None, "cc could not build lorakern/native/lora_cpu.c on this machine"
    wrapped = _Spy(library)
    monkeypatch.setattr(native, "lora_library", lambda: wrapped)
    return wrapped


SHAPES = [(1, 6, 42, 1), (6, 42, 123, 3), (42, 123, 6, 8), (123, 431, 42, 17), (7, 16, 32, 16), (5, 33, 64, 2),
          (9, 48, 80, 5)]  # the last two: 64-byte rows, written with streaming stores where the CPU has them


@pytest.mark.parametrize("M,K,N,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_native_path_matches_the_reference(spy, M, K, N, r, bias, dropout):
    layer = random_layer(K, N, r, torch.float32, bias=bias, dropout=dropout).train()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K))
    assert_matches_reference(compare_layer(layer, x))
    assert spy.calls == ["lora_forward_f32", "lora_backward_scratch", "lora_backward_f32"], spy.calls


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_input_on_one_thread_and_two(spy, threads):
    """Two threads split the rows and sum their partial dA and dB; one thread has no partner to sum."""
    layer = random_layer(42, 123, 8, torch.float32)
    x = torch.randn(3, 41, 42)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(compare_layer(layer, x))
    finally:
        torch.set_num_threads(previous)
    assert "lora_backward_f32" in spy.calls


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B", "bias", "x"])
def test_any_subset_of_gradients(spy, frozen):
    """Each output the backward skips must leave the others exact; an expanded gradient (stride 0) works."""
    layer = random_layer(45, 37, 5, torch.float32)
    x = torch.randn(19, 45, requires_grad=frozen != "x")
    if frozen != "x":
        getattr(layer, frozen).requires_grad_(False)
    with torch.no_grad():
        reference = random_layer(45, 37, 5, torch.float64)
        reference.load_state_dict(layer.state_dict())
    for name, p in reference.named_parameters():
        p.requires_grad_(dict(layer.named_parameters())[name].requires_grad)
    xr = x.detach().double().requires_grad_(frozen != "x")
    for module, inp in ((layer, x), (reference, xr)):
        module(inp).sum().backward()  # .sum()'s gradient is an expanded tensor with stride 0
    for name, p in layer.named_parameters():
        q = dict(reference.named_parameters())[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-4, msg=name)
    if frozen != "x":
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    assert "lora_backward_f32" in spy.calls


@pytest.mark.parametrize(
    "case", ["float64", "bfloat16", "rank-over-256", "native-off", "no-rows"],
)
def test_falls_back_to_the_torch_formulation(spy, monkeypatch, case):
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    r = 300 if case == "rank-over-256" else 4
    M = 0 if case == "no-rows" else 9
    if case == "native-off":
        monkeypatch.setattr(native, "lora_library", lambda: None)
    layer = random_layer(24, 12, r, dtype)
    x = torch.randn(M, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert spy.calls == [], spy.calls
    if M:
        assert_matches_reference(compare_layer(layer, x))


def test_native_library_is_chosen_only_for_float32_cpu():
    x = torch.randn(3, 4)
    w, a = torch.randn(5, 4), torch.randn(2, 4)
    assert functional._native_library(x.double(), w.double(), None, a.double()) is None
    assert functional._native_library(x, w, torch.zeros(5, dtype=torch.float64), a) is None
    assert functional._native_library(x[:0], w, None, a) is None


def test_the_build_cache_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    """-march=native code from one CPU must not load on another that shares the cache folder."""
    monkeypatch.setenv("LORAKERN_CACHE", str(tmp_path))
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    monkeypatch.setattr(native, "_LOADED", {})
    built = []
    for cpu in ("cpu-a", "cpu-b", "cpu-a"):
        monkeypatch.setattr(native, "_cpu_signature", lambda cpu=cpu: cpu)
        native._LOADED.clear()
        assert native.lora_library() is not None
        built.append(sorted(p.name for p in tmp_path.iterdir()))
    assert len(built[0]) == 1 and len(built[1]) == 2 and built[2] == built[1], built

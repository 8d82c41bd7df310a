"""The C kernels for the rank-r products on CPU (lorakern/native/lora_cpu.c) against the float64 reference:
output and every gradient at every ISA level this CPU executes (AVX-512, AVX2, generic), odd shapes that
hit the four-row and vector-lane tails, every subset of gradients, the cases that must fall back to the
plain-torch formulation, a broken compiler reported, and both formulations of the cost model."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given

import strategies
from lorakern import native
from lorakern.testing import (LibrarySpy, assert_matches_reference, bound, compare_layer, magnitudes, random_layer,
                              reference_scaling)


def _compiler_or_skip():
    import shutil

    import os

    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler {compiler!r} on this machine: the torch path serves (tested below)")


LEVELS = [level.name for level in native.levels_here()]


@pytest.fixture(params=LEVELS)
def spy(request, monkeypatch):
    """The library built for one ISA level this CPU executes (every one in turn), counting its calls."""
    _compiler_or_skip()
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    level = next(level for level in native.levels_here() if level.name == request.param)
    library = native.lora_library(level)
    assert library is not None, native.build_status()
    wrapped = LibrarySpy(library)
    monkeypatch.setattr(native, "lora_library", lambda: wrapped)
    return wrapped


SHAPES = [(1, 6, 42, 1), (6, 42, 123, 3), (42, 123, 6, 8), (123, 431, 42, 17), (7, 16, 32, 16), (5, 33, 64, 2),
          (9, 48, 80, 5),  # these two: 64-byte rows, written with streaming stores where the CPU has them
          (9, 1100, 1030, 17),  # rows past dots4's DOT_TILE (tiles and a tail) and r past DOT_GROUP (a second, odd group)
          (37, 4100, 4000, 5)]  # wide rows: the backward's chunks shrink to 16 rows (chunk_blocks), three chunks here


@pytest.mark.parametrize("M,K,N,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_native_path_matches_the_reference(spy, M, K, N, r, bias, dropout):
    # alpha = 2.5 r: s = 2.5, so a scaling dropped, or applied twice (to each thread's partial sum), is seen
    # (alpha None gives s = 1, where both are invisible)
    layer = random_layer(K, N, r, torch.float32, bias=bias, dropout=dropout, alpha=2.5 * r).train()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K))
    assert_matches_reference(compare_layer(layer, x))
    # B^T for each pass by one C transpose (torch's strided copy cost more than a small call's whole C pass)
    assert spy.calls == ["lora_forward_f32", "lora_backward_scratch", "lora_backward_f32"], spy.calls


MERGE_SHAPES = [(1, 6, 1), (6, 42, 3), (42, 123, 8), (123, 431, 17), (64, 32, 16), (7, 33, 5)]


def _merge_reference(W, A, B, s, c):
    merged = W.double().numpy() + s * (B.double().numpy() @ A.double().numpy())
    return merged if c is None else c.double().numpy()[:, None] * merged


def _merge_limit(W, A, B, s, c) -> np.ndarray:
    """The fp32 bound of each entry of the merge: bound(r + 1 terms) times the terms' magnitudes
    |c| (|W| + s |B| |A|)."""
    size = np.abs(W.double().numpy()) + s * (np.abs(B.double().numpy()) @ np.abs(A.double().numpy()))
    if c is not None:
        size = np.abs(c.double().numpy())[:, None] * size
    return bound(torch.float32, A.shape[0] + 1) * size + 1e-30


def _merge_error(got, W, A, B, s, c) -> float:
    """The largest error of ``got`` against the float64 merge, in units of each entry's bound."""
    return float(np.max(np.abs(got.double().numpy() - _merge_reference(W, A, B, s, c)) / _merge_limit(W, A, B, s, c)))


@pytest.mark.parametrize("N,K,r", MERGE_SHAPES, ids=[f"N{n}-K{k}-r{r}" for n, k, r in MERGE_SHAPES])
@pytest.mark.parametrize("scaled", [False, True], ids=["W+sBA", "diag(c)(W+sBA)"])
def test_the_merged_weight_in_one_pass(spy, N, K, r, scaled):
    """formulation.merged_weight through lora_merge_f32 (rows of W four at a time, N % 4 != 0 writes past the
    last row into a spare; K off the vector multiples takes the scalar tail) against the float64 merge, with
    DoRA's row scale and without; the same comparison fails on a merge off by a few times its bound."""
    from lorakern.formulation import merged_weight, release_workspaces

    gen = torch.Generator().manual_seed(N * 1000 + K + r)
    W, A, B = (torch.randn(*shape, generator=gen) for shape in ((N, K), (r, K), (N, r)))
    c = torch.rand(N, generator=gen) + 0.5 if scaled else None
    got = merged_weight(W, B, A, 1.75, spy, c).clone()
    assert spy.calls == ["lora_merge_f32"], spy.calls
    assert _merge_error(got, W, A, B, 1.75, c) <= 1.0
    # a perturbation of four bounds at one entry is seen
    bad = got.clone()
    bad[N // 2, K // 2] += 4 * float(_merge_limit(W, A, B, 1.75, c)[N // 2, K // 2])
    assert _merge_error(bad, W, A, B, 1.75, c) > 1.0
    release_workspaces()


def test_the_merged_forms_use_the_one_pass_merge(spy):
    """A merged forward and backward (pinned) form W' in C, and the layer still matches the reference."""
    from lorakern.formulation import pinned_formulation

    layer = random_layer(24, 20, 5, torch.float32, bias=True).train()
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(3))
    with pinned_formulation("merged"):
        assert_matches_reference(compare_layer(layer, x))
    assert spy.calls.count("lora_merge_f32") >= 2 and "lora_forward_f32" not in spy.calls, spy.calls


SEEN = []
# 1 case in WIDE_SHARE is a wide one (strategies.WIDE: dots4's tiles and second group of r, the backward's
# chunks below 64 rows): a few seconds per ISA level in the CI profile
WIDE_SHARE = 12


@given(case=strategies.lora_cases([torch.float32], wide_share=WIDE_SHARE))
def _c_path_matches_reference(case):
    SEEN.append(case)
    layer = random_layer(case.K, case.N, case.r, torch.float32, bias=case.bias, dropout=case.dropout, seed=case.seed)
    layer.backend = "c"
    assert_matches_reference(compare_layer(layer.train(), strategies.make_input(case), seed=case.seed))


def test_c_path_property(spy):
    """The C kernels on every tile class, layout and rank class, and on wide rows (K, N > 1024, r > 16,
    several backward chunks; the stated shares asserted on the examples that ran), at each ISA level this
    CPU executes."""
    SEEN.clear()
    _c_path_matches_reference()
    strategies.assert_shares(SEEN, strategies.axes_for([torch.float32], wide=strategies.wide_shares(WIDE_SHARE)))
    assert "lora_backward_f32" in spy.calls


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_input_on_one_thread_and_two(spy, threads):
    """Two threads split the rows and sum their partial dA and dB (each scaled once, s = 0.75); one thread
    has no partner to sum."""
    layer = random_layer(42, 123, 8, torch.float32, alpha=6.0)
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
    # each gradient element within the fp32 bound for reductions of length max(M, K, N) = 45, relative to
    # the magnitude of its terms (lorakern.testing), computed from the float64 operands
    f64 = lambda t: t.detach().double().numpy()
    ones = np.ones((19, 37))
    mag = magnitudes(f64(x), f64(layer.weight), f64(layer.lora_A), f64(layer.lora_B), f64(layer.bias), ones,
                     reference_scaling(5, layer.alpha, False), None, torch.finfo(torch.float32).tiny)
    tolerance = bound(torch.float32, 45)
    grads = {"lora_A": "dA", "lora_B": "dB", "bias": "db"}
    for name, p in layer.named_parameters():
        q = dict(reference.named_parameters())[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            error = np.abs(f64(p.grad) - f64(q.grad))
            scale = mag[grads[name.split(".")[-1]]]
            assert np.all(error <= tolerance * scale), (name, (error / scale).max(), tolerance)
    if frozen != "x":
        error = np.abs(f64(x.grad) - f64(xr.grad))
        assert np.all(error <= tolerance * mag["dx"]), ((error / mag["dx"]).max(), tolerance)
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


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build cache and no library loaded yet: the next call compiles."""
    monkeypatch.setenv("LORAKERN_CACHE", str(tmp_path))
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_FAILURES", {})
    return tmp_path


@pytest.mark.parametrize("compiler,message", [("false", "false failed to build lora_cpu.c"),
                                              ("no-such-cc-here", "no C compiler 'no-such-cc-here' found")])
def test_a_failed_build_is_reported_and_the_torch_path_serves(fresh_build, monkeypatch, compiler, message):
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(RuntimeWarning, match=message):
        assert native.lora_library() is None
    level, why = native.build_status()
    assert level is None and message in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        assert native.lora_library() is None
    assert_matches_reference(compare_layer(random_layer(24, 12, 4, torch.float32), torch.randn(9, 24)))


def test_the_compiler_error_reaches_the_user(fresh_build, monkeypatch, tmp_path):
    """A compiler that runs and fails: its own first lines of error are in the warning."""
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'lora_cpu.c:1:1: error: this compiler is broken on purpose' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match="exit 3.*error: this compiler is broken on purpose"):
        assert native.lora_library() is None


def test_the_isa_level_can_be_capped_and_a_bad_one_is_refused(monkeypatch):
    here = [level.name for level in native.levels_here()]
    for name in here:
        monkeypatch.setenv(native.ISA_ENV, name)
        assert native.chosen_level().name == name
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="'sse9' is not an ISA level.*set it to one of"):
        native.chosen_level()
    # a CPU without AVX-512: the best it runs is chosen, and asking for AVX-512 names the missing flags
    monkeypatch.setattr(native, "cpu_info", lambda: {"flags": "sse2 avx avx2 fma f16c bmi1 bmi2"})
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(native.ISA_ENV)
    assert native.chosen_level().name == "avx2"
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match="lacks.*avx512bw.*set it to one of avx2, generic"):
        native.chosen_level()
    monkeypatch.setattr(native, "cpu_info", lambda: {"flags": "sse2"})
    monkeypatch.delenv(native.ISA_ENV)
    assert native.chosen_level().name == "generic"


def test_the_capped_level_is_the_one_built_and_used(fresh_build, monkeypatch):
    """LORAKERN_ISA makes lora_library() (what every layer asks for) build and load that level, and
    build_status (lorakern check's row) name it: each lower level this CPU runs, then the default again."""
    _compiler_or_skip()
    here = [level.name for level in native.levels_here()]
    for name in here[1:] + here[:1]:
        monkeypatch.setenv(native.ISA_ENV, name)
        library = native.lora_library()
        assert library is not None and library is native._LOADED[("lora_cpu", name)]
        assert native.build_status() == (name, None)
        assert any(p.name.startswith(f"lora_cpu-{name}-") for p in fresh_build.iterdir()), list(fresh_build.iterdir())
        layer, x = random_layer(24, 12, 4, torch.float32), torch.randn(9, 24)
        assert "runs: c" in layer.dispatch_report(x), layer.dispatch_report(x)
        assert_matches_reference(compare_layer(layer, x))
    monkeypatch.delenv(native.ISA_ENV)
    assert native.build_status() == (here[0], None)


def test_the_c_implementation_takes_float32_cpu_rows_only():
    from lorakern import dispatch

    def call(x, r=2):
        return dispatch.Call(x, "dense", torch.randn(5, 4, dtype=x.dtype), None, torch.randn(r, 4, dtype=x.dtype),
                             torch.randn(5, r, dtype=x.dtype), 1.0)

    x = torch.randn(3, 4)
    assert dispatch.verdict("c", call(x.double())) == "fp32 only (this call computes in torch.float64)"
    assert dispatch.verdict("c", call(x[:0])) == "no rows"
    assert dispatch.verdict("c", call(x, r=300)) == "r=300 > 256"
    if native.lora_library() is not None:
        assert dispatch.verdict("c", call(x)) is None
        assert dispatch.choose(call(x))[0].name == "c"
    assert dispatch.choose(call(x.double()))[0].name == "torch"


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


def test_the_build_key_hashes_every_part_the_source_includes(tmp_path, monkeypatch):
    """lora_cpu.c is one translation unit that #includes its parts from lora_cpu/: each part it includes is
    hashed into the cache key (an edit to any of them builds anew; a stale library would run old code)."""
    import re
    import shutil

    source = open(f"{native.HERE}/lora_cpu.c").read()
    included = re.findall(r'#include "(lora_cpu/[^"]+)"', source)
    assert included
    shutil.copy(f"{native.HERE}/lora_cpu.c", tmp_path)
    shutil.copytree(f"{native.HERE}/lora_cpu", tmp_path / "lora_cpu")
    monkeypatch.setattr(native, "HERE", str(tmp_path))
    hashed = [part.split(b"\0", 1)[0].decode() for part in native._source_bytes("lora_cpu")]
    assert hashed[0] == "lora_cpu.c" and sorted(f"lora_cpu/{name}" for name in hashed[1:]) == sorted(included)
    before = b"".join(native._source_bytes("lora_cpu"))
    for part in included:
        path = tmp_path / part
        original = path.read_text()
        path.write_text(original + "\n/* edited */\n")
        assert b"".join(native._source_bytes("lora_cpu")) != before, part
        path.write_text(original)
    assert b"".join(native._source_bytes("lora_cpu")) == before


def test_the_wheel_carries_the_c_sources_and_their_parts(tmp_path):
    """A non-editable install builds the C kernels from the installed package: every source and part ships."""
    import os
    import subprocess
    import sys
    import zipfile

    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # built from a copy: setuptools writes build/ beside setup.py
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), tree / name)
    for name in ("lorakern", "kernels"):
        shutil.copytree(os.path.join(root, name), tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(tree)], capture_output=True, text=True)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    wheel, = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    here = os.path.join(root, "lorakern", "native")
    wanted = {f"lorakern/native/{f}" for f in os.listdir(here) if f.endswith(".c")}
    wanted |= {f"lorakern/native/lora_cpu/{f}" for f in os.listdir(os.path.join(here, "lora_cpu"))}
    assert wanted <= names, sorted(wanted - names)

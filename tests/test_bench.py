"""The benchmark's providers compute the same layer, its memory tracker counts honestly, and its quick
mode runs end to end through the CLI (no timing assertions)."""
import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorakern import bench, core
from lorakern.cli import main

PROVIDERS = list(bench.providers("cpu"))


def test_peers_are_installed_here():
    # The test environment has PEFT and loralib: their wrappers below must not be silently skipped.
    assert {"PEFT lora.Linear", "loralib Linear", "lorakern torch", "naive (forms B@A)"} <= set(PROVIDERS)


@pytest.mark.parametrize("name", PROVIDERS)
def test_every_provider_computes_the_reference_output_and_gradients(name):
    shape = bench.Shape("t", 7, 19, 11, 3)
    o = bench.make_operands(shape, torch.float64, "cpu")
    built = bench.providers("cpu")[name](o)
    y = built.forward()
    grads = torch.autograd.grad(y, built.params, o.grad)
    f64 = lambda t: t.detach().numpy()
    x, W, A, B, b, g = map(f64, (o.x, o.W, o.A, o.B, o.b, o.grad))
    if name == bench.FROZEN:
        expected_y, expected_grads = x @ W.T + b, [g @ W]
    elif "DoRA" in name:  # the magnitude the providers use: 1.1 x the row norms of W + s B A
        m = 1.1 * core.dora.weight_norm(W, A, B, o.s)
        expected_y = core.dora.forward(x, W, A, B, m, b, o.s)
        ref = core.dora.backward(x, W, A, B, m, g, o.s)
        expected_grads = [ref["dx"], ref["dA"], ref["dB"], ref["dm"]]
    else:
        expected_y = core.forward(x, W, A, B, b, o.s)
        ref = core.backward(x, W, A, B, g, o.s)
        expected_grads = [ref["dx"], ref["dA"], ref["dB"]]
    np.testing.assert_allclose(f64(y), expected_y, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(f64(got), want, rtol=1e-12, atol=1e-12)


def test_every_mode_steps_and_the_backward_alone_reuses_one_forward():
    o = bench.make_operands(bench.Shape("t", 5, 6, 4, 2), torch.float64, "cpu")
    forwards = []
    built = bench.providers("cpu")["lorakern torch"](o)
    counted = bench.Built(lambda: forwards.append(1) or built.forward(), built.params)
    step = bench._step(counted, o.grad, "bwd")
    step.setup()
    for _ in range(3):
        step.run()  # retain_graph: three backward calls through one forward
    assert len(forwards) == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        bench._step(counted, o.grad, "sideways")


def test_allocation_tracker_counts_live_bytes_and_frees():
    x = torch.ones(10, 10)
    with bench.AllocationTracker() as tracker:
        a = x * 2  # 400 B
        b = a + 1  # 400 B
        del a
        c = b * 3  # a is freed before c: the peak stays at 800 B
        view = c[:5]  # views allocate nothing
        c.mul_(2)  # nor do in-place ops
    assert tracker.peak == 800 and tracker.current == 800
    assert view.shape == (5, 10)


def test_lorakern_training_step_peak_memory_is_the_frozen_layers_plus_rank_r_activations():
    shape = bench.Shape("t", 512, 96, 80, 4)
    o = bench.make_operands(shape, torch.float32, "cpu")
    available = bench.providers("cpu")
    frozen = bench.peak_memory(available[bench.FROZEN](o), o.grad, "fwd+bwd", "cpu")
    ours = bench.peak_memory(available["lorakern torch"](o), o.grad, "fwd+bwd", "cpu")
    peft = bench.peak_memory(available["PEFT lora.Linear"](o), o.grad, "fwd+bwd", "cpu")
    size = o.x.element_size()
    activations = 2 * shape.M * shape.r * size  # u (saved, or formed in the backward) and g B (transient), M x r
    parameter_sized = 4 * shape.r * (shape.K + shape.N) * size  # dA, dB and r x N layout copies of B
    workspace = shape.N * shape.K * size  # the merged forward's W' (this shape takes it): one per shape and thread
    assert frozen >= shape.M * (shape.N + shape.K) * size  # y and dx
    assert ours - frozen <= activations + parameter_sized + workspace, (ours, frozen)
    assert peft - frozen > shape.M * shape.N * size, "PEFT keeps an M x N temporary: the tracker must see it"


@pytest.mark.parametrize("form", ["factored", "merged"])
@pytest.mark.parametrize("native", [True, False], ids=["C kernels", "LORAKERN_NATIVE=0"])
def test_lorakern_training_step_memory_grows_with_tokens_by_exactly_the_rank_r_activations(native, form, monkeypatch):
    """What grows with the token count M beyond the frozen layer's step: factored, u (M x r), and nothing
    else with the C kernels (g B is never stored); the factored torch path also holds g B (M x r) for a
    moment. Merged: nothing (its forward keeps no u; the backward forms u, and g B, and frees them before
    dx = g W', where the step's peak is). The rest of the difference (dA, dB, B^T copies, the C kernels'
    per-thread partial sums, the merged form's N x K W + s B A) does not depend on M. Each formulation
    pinned, so both token counts take the same one."""
    from lorakern import formulation
    from lorakern.formulation import pinned_formulation

    if not native:
        monkeypatch.setenv("LORAKERN_NATIVE", "0")
    K, N, r = 96, 80, 4

    def extra(M):
        formulation.release_workspaces()  # each step allocates the merged form's W' workspace afresh: it cancels
        o = bench.make_operands(bench.Shape("t", M, K, N, r), torch.float32, "cpu")
        available = bench.providers("cpu")
        frozen = bench.peak_memory(available[bench.FROZEN](o), o.grad, "fwd+bwd", "cpu")
        return bench.peak_memory(available["lorakern torch"](o), o.grad, "fwd+bwd", "cpu") - frozen

    small, large = 256, 1024
    with pinned_formulation(form):
        per_token = (extra(large) - extra(small)) / (large - small)
    # the factored torch path holds g B while dx's rank-r term is formed; merged keeps no u and frees g B before dx
    expected = 0 if form == "merged" else (1 if native else 2) * r * 4
    assert per_token == expected, (per_token, "bytes per token; r * 4 is one fp32 M x r tensor")


def test_quick_cli_run_writes_json_markdown_and_plot(tmp_path, capsys):
    # no --malloc: the allocator is left as it is (keep_freed_memory is process-wide: tested in a child below)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--plot"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "lora_linear.json").read_text())
    rows = data["rows"]
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["date"]
    assert data["machine"]["peft"] and data["machine"]["loralib"] and data["machine"]["processor"]
    # the CPU's vector flags and the C kernels' level beside the numbers (RESULTS.md quotes the title)
    from lorakern import native

    flags = set(native.cpu_info().get("flags", "").split())
    assert data["machine"]["cpu_flags"].split() == [f for f in bench.VECTOR_FLAGS if f in flags]
    level, why = native.build_status()
    assert data["machine"]["c_kernels"] == (level or f"not built: {why}")
    title = next(line for line in printed.splitlines() if " on " in line and "rounds)" in line)
    assert f"CPU flags: {data['machine']['cpu_flags'] or '-'}; C kernels: {data['machine']['c_kernels']}" in title
    assert title in (tmp_path / "lora_linear.md").read_text()
    # the formulation each lorakern row took is in its row: factored at this small M, merged where pinned
    forms = {r["provider"]: r["formulation"] for r in rows}
    assert forms["lorakern torch"] == "factored/factored" and forms["lorakern, merged"] == "merged/merged"
    assert forms["PEFT lora.Linear"] is None
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    assert {r["mode"] for r in rows} == set(bench.MODES)
    assert len(rows) == len(PROVIDERS) * len(bench.MODES)
    assert all(r["ratio_median"] > 0 and len(r["samples"]) == 2 and r["peak_bytes"] > 0 for r in rows)
    # every ratio recomputed from the stored samples against the frozen layer's row of the same shape and mode
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == bench.FROZEN}
    for r in rows:
        frozen = base[(r["shape"], r["mode"])]
        assert r["min_ms"] == min(r["samples"]) and r["ratio_min"] == pytest.approx(r["min_ms"] / frozen["min_ms"])
        paired = statistics.median(v / b for v, b in zip(r["samples"], frozen["samples"]))
        assert r["ratio_paired"] == pytest.approx(paired), r["provider"]
    assert all(r["ratio_paired"] > 0 and r["faults_per_call"] >= 0 for r in rows)
    assert data["machine"]["malloc"] == "default"
    assert {r["operation"] for r in data["nf4"]} == {"quantize", "dequantize", "forward (4-bit layer)"}
    markdown = (tmp_path / "lora_linear.md").read_text()
    assert "| frozen nn.Linear |" in markdown and "| PEFT lora.Linear |" in markdown and "bitsandbytes" in markdown
    assert "| lorakern torch |" in printed
    assert (tmp_path / "lora_linear.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_form_column_shows_the_cost_models_choice_on_each_side_of_the_switch():
    """lorakern bench's "form fwd/bwd" column: what formulation.choose_formulation picks for the row's shape
    (no dropout, the benchmark's case), on each side of both switches, and the pins of the pinned providers."""
    from lorakern.formulation import BACKWARD_MERGE_OVERHEAD, FORWARD_MERGE_OVERHEAD

    K, N, r = 96, 80, 4
    forward_switch, backward_switch = K * (r + FORWARD_MERGE_OVERHEAD) // r, N * (r + BACKWARD_MERGE_OVERHEAD) // r
    assert forward_switch < backward_switch  # this shape merges the forward first
    form = lambda provider, M: bench._formulation(provider, bench.Shape("t", M, K, N, r), torch.float32)
    assert form("lorakern torch", forward_switch) == "factored/factored"
    assert form("lorakern torch", forward_switch + 1) == "merged/factored"
    assert form("lorakern torch, no C", backward_switch + 1) == "merged/merged"
    assert form("lorakern, factored", 10**6) == "factored/factored" and form("lorakern, merged", 1) == "merged/merged"
    assert bench._formulation("lorakern torch", bench.Shape("t", 10**6, K, N, r), torch.bfloat16) == "factored/factored"
    assert form("PEFT lora.Linear", 10**6) is None and form(bench.FROZEN, 10**6) is None


def test_cli_times_only_the_asked_providers_and_modes(tmp_path):
    asked = ["lorakern torch", "lorakern torch, no C"]  # a name with a comma in it
    argv = ["bench", "--quick", "--provider", asked[0], "--provider", asked[1], "--modes", "fwd,bwd",
            "--malloc", "default", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "lora_linear.json").read_text())["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in (bench.FROZEN, *asked) for m in ("fwd", "bwd")}


_RECYCLE = """
import resource, sys, torch
from lorakern import bench
if sys.argv[1] == "keep":
    bench.keep_freed_memory()
counts = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # two 12 MB activations and a 4 MB temporary, freed out of order as in a training step
    a, b, c = torch.ones(4096, 768), torch.ones(4096, 768), torch.ones(1024, 1024)
    del a, c, b
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(counts[6:]), bench.machine()["malloc"])
"""


def test_keep_freed_memory_stops_recycled_buffers_from_faulting_in_again():
    """With ``--malloc keep`` (the bench CLI's labelled extra) the rounds after warm-up of a loop that frees and
    allocates activation-sized buffers fault no pages in. (Under glibc's defaults the same loop faults
    ~7,000 pages per round in most runs, none in others: it depends on where the heap lands, so only the
    kept side is asserted.)"""
    def run(setting):
        done = subprocess.run([sys.executable, "-c", _RECYCLE, setting], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        count, malloc = done.stdout.split(maxsplit=1)
        return int(count), malloc.strip()

    for _ in range(3):
        kept, setting = run("keep")
        assert kept == 0 and setting.startswith("glibc, freed memory kept"), (kept, setting)
    assert run("default")[1] == "default"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dtype", "int8"], "--dtype must be float32, float16 or bfloat16, got 'int8'"),
        (["--shapes", "1x1"], "unknown layer '1x1'; choose from 768x768"),
        (["--ranks", "8,x"], "--ranks must be comma-separated integers"),
        (["--ranks", "0"], "rank must be a positive integer, got 0"),
        (["--plot"], "pass --out DIR as well"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--tokens", "0"], "--tokens must be a positive integer"),
        (["--provider", "lorakern torch", "--provider", "PEFT"],
         "unknown or unavailable provider(s) ['PEFT']; available here: ['frozen nn.Linear'"),
        (["--modes", "fwd,train"], "mode must be one of ('fwd', 'bwd', 'fwd+bwd'), got 'train'"),
    ],
)
def test_bad_bench_flags_name_the_value_and_the_fix(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
    assert bench.machine()["malloc"] == "default", "a bad flag must fail before the allocator is changed"


def test_measure_rejects_bad_rounds_and_providers():
    shape = bench.SHAPES_QUICK[0]
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        bench.measure(shape, torch.float32, "cpu", rounds=0)
    with pytest.raises(ValueError, match=r"unknown or unavailable provider\(s\) \['nope'\]"):
        bench.measure(shape, torch.float32, "cpu", only=["nope"])


def test_default_grid_covers_the_real_layers_and_ranks():
    grid = {(s.K, s.N, s.r) for s in bench.SHAPES_CPU}
    assert grid == {(K, N, r) for K, N in ((768, 768), (768, 3072), (4096, 4096)) for r in (8, 16, 64)}
    assert all(s.M == 8192 for s in bench.SHAPES_GPU)


def test_flop_and_byte_counts():
    shape = bench.Shape("t", 8, 4, 2, 1)
    assert bench.flops(shape, "fwd", lora=False) == 2 * 8 * 2 * 4
    assert bench.flops(shape, "fwd", lora=True) == 2 * 8 * 2 * 4 + 2 * 8 * 4 + 2 * 8 * 2
    assert bench.flops(shape, "bwd", lora=False) == bench.flops(shape, "fwd", lora=False)
    assert bench.flops(shape, "fwd+bwd", lora=True) == bench.flops(shape, "fwd", True) + bench.flops(shape, "bwd", True)
    assert bench.min_bytes(shape, "fwd", 2) == (8 * 4 + 2 * 4 + 8 * 2 + 1 * (4 + 2) + 8) * 2


@pytest.mark.parametrize("script,stem", [("bench_mixed.py", "mixed"), ("bench_dora.py", "dora")])
def test_gpu_target_scripts_run_quick_and_check_before_timing(script, stem, tmp_path):
    """The device script's steps 6 and 7 end to end on tiny shapes (interpreted on the CPU): every correctness
    check passes (exit 0), and the report names each check and each timed pair. No timing assertions."""
    import json
    import os
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", script)
    done = subprocess.run([sys.executable, path, "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["checks"] and all(c["ok"] for c in payload["checks"])
    assert payload["rows"] and all(r["lorakern_ms"] > 0 and r["reference_ms"] > 0 for r in payload["rows"])
    assert (tmp_path / f"{stem}.md").read_text().startswith("DoRA, " if stem == "dora" else "Mixed-adapter batch, ")


def test_small_batch_script_runs_quick_and_checks_peft_against_lorakern(tmp_path):
    """benchmarks/bench_small_batch.py end to end on a 1-layer model: PEFT, loading lorakern's saved adapters,
    gives lorakern's output, disabled adapters give the frozen model's, the adapters move the output (exit 0),
    and every timed row is there. No timing assertions."""
    import json
    import os
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_small_batch.py")
    done = subprocess.run([sys.executable, path, "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "small_batch.json").read_text())
    assert [c["check"] for c in payload["checks"]] == ["PEFT's output = lorakern's", "adapters disabled = frozen model",
                                                       "the adapters change the output"]
    assert all(c["ok"] for c in payload["checks"])
    assert len(payload["rows"]) == 4 and all(r["lorakern_ms"] > 0 and r["reference_ms"] > 0 for r in payload["rows"])
    bad = subprocess.run([sys.executable, path, "--tokens", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--tokens 0: give a number >= 1" in bad.stderr

"""`lorakern check` and how the package installs."""
import io
import subprocess
import sys

import pytest

import torch

from lorakern.check import run_check


def test_check_passes_and_prints_the_table():
    out = io.StringIO()
    assert run_check("cpu", out=out)
    text = out.getvalue()
    import re

    try:
        import triton  # noqa: F401
    except ImportError:  # installed without the triton extra: one row says why the path did not run
        paths = ("torch",)
        assert re.search(r"\| triton +\| all +\|.*not run: .*lorakern\[triton\].*\| n/a +\|", text), text
    else:
        paths = ("torch", r"triton \((interpreted|compiled)\)")
    for path in paths:
        for dtype in ("float32", "float16", "bfloat16"):
            assert re.search(rf"\| {path} +\| {dtype} +\|.*\| pass +\|", text), (path, dtype, text)
            assert re.search(rf"\| DoRA: torch +\| {dtype} +\|.*\| pass +\|", text), (dtype, text)
    assert "all paths pass" in text


def test_check_fails_on_a_wrong_dora_path(monkeypatch):
    """The DoRA rows see a wrong magnitude gradient (the row names it) and a wrong output."""
    import dataclasses
    import re

    from lorakern import dispatch
    from lorakern.check import dora_rows

    real = dispatch._REGISTRY[("torch", "dense")]

    def off_by_a_little(call):
        y = real.run_dora(call)
        return y + 1e-2 * y.detach().abs().amax()

    monkeypatch.setitem(dispatch._REGISTRY, ("torch", "dense"), dataclasses.replace(real, run_dora=off_by_a_little))
    rows = dora_rows(torch.device("cpu"))
    failed = {row[1] for row in rows if row[0] == "DoRA: torch" and row[-1] == "FAIL"}
    assert failed == {"float64", "float32", "float16", "bfloat16"}, rows
    assert all(re.match(r"(y|dx|dA|dB|dm|db) @", row[3]) for row in rows if row[-1] == "FAIL"), rows


def test_check_fails_on_a_wrong_path(monkeypatch):
    """An error of 1% of the largest output is outside every dtype's bound, bf16's and fp16's included
    (their bound follows each element's rounded values, not a flat 2 eps of the magnitude)."""
    import dataclasses
    import re

    from lorakern import dispatch

    real = dispatch._REGISTRY[("torch", "dense")]

    def off_by_a_little(call):
        y = real.run(call)
        return y + 1e-2 * y.detach().abs().amax()

    monkeypatch.setitem(dispatch._REGISTRY, ("torch", "dense"), dataclasses.replace(real, run=off_by_a_little))
    out = io.StringIO()
    assert not run_check("cpu", out=out)
    text = out.getvalue()
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        assert re.search(rf"\| torch +\| {dtype} +\|.*\| FAIL +\|", text), (dtype, text)


def test_cli_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorakern", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all paths pass" in done.stdout


def test_kernels_ship_under_lorakern_not_top_level(tmp_path):
    code = ("import importlib.util, lorakern.kernels; "
            "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels'); "
            "print(lorakern.kernels.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "lorakern.kernels"


def test_public_names():
    import lorakern

    for name in lorakern.__all__:
        assert getattr(lorakern, name) is not None
    assert callable(lorakern.inject) and isinstance(lorakern.LoraLinear(4, 4, r=2), torch.nn.Module)


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    """require() turns a missing optional package into an ImportError that says which extra installs it,
    and the CLI prints it as one line."""
    import importlib

    from lorakern.cli import main
    from lorakern.errors import require

    real_import = importlib.import_module

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_tokenizers)
    with pytest.raises(ImportError, match=r"tokenizers is needed for the harness but is not installed; install it "
                                          r"with pip install 'lorakern\[harness\]'"):
        require("tokenizers", "harness", "the harness")
    assert main(["glue", "--task", "sst2", "--out", "/nonexistent/never-written"]) == 2  # one line, exit 2


@pytest.fixture
def c_rows_only(monkeypatch):
    """run_check cut to its torch and C rows on one small shape (the C row's label and status are the subject)."""
    from lorakern import check

    monkeypatch.setattr(check, "GRID", [((6, 42), 12, 5, 0.0)])
    monkeypatch.setattr(check, "available_paths", lambda device: ["torch", "c"])
    for rows in ("mixed_rows", "dora_rows", "mixed_dora_rows"):
        monkeypatch.setattr(check, rows, lambda device: [])


def test_check_shows_the_c_kernels_row_with_the_isa_level_built(c_rows_only):
    import re

    from lorakern import native

    level, why = native.build_status()
    if level is None:
        pytest.skip(f"the C kernels are not built here: {why}")
    out = io.StringIO()
    assert run_check("cpu", out=out)
    text = out.getvalue()
    assert re.search(rf"\| C kernels \({level}\) +\| float32 +\| [0-9.e+-]+ +\|.*\| pass +\|", text), text
    assert re.search(rf"\| C kernels \({level}\) +\| float64 +\| - +\| not run by this path: fp32 only", text), text


def test_check_shows_why_the_c_kernels_did_not_build(c_rows_only, monkeypatch, tmp_path):
    """CC=false: the C row says the compiler failed (naming it and the level), the torch rows still pass."""
    import re
    import warnings

    from lorakern import native

    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LORAKERN_CACHE", str(tmp_path))
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_FAILURES", {})
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_check("cpu", out=out)
    text = out.getvalue()
    level = native.chosen_level().name
    assert re.search(rf"\| C kernels +\| all +\| - +\| not run: not built: false failed to build lora_cpu.c for {level} "
                     rf"\(exit 1\).*\| n/a +\|", text), text
    assert re.search(r"\| torch +\| float32 +\|.*\| pass +\|", text), text
    assert [str(w.message) for w in caught if "lora_cpu.c" in str(w.message)], "the failure was not warned about"


def test_check_with_a_bad_isa_level_says_so_in_one_line(monkeypatch, capsys):
    """LORAKERN_ISA naming no level ends `lorakern check` with one line naming it and the fix (exit 2), not a
    traceback. (A bad LORAKERN_FORMULATION does not reach check: it pins each formulation itself.)"""
    from lorakern.cli import main

    monkeypatch.setenv("LORAKERN_ISA", "sse9")
    assert main(["check", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "LORAKERN_ISA='sse9' is not an ISA level" in err and "set it to one of" in err, err

"""lorakern: LoRA layers with fused kernels, a float64 reference, and PEFT-compatible adapters.

The package's metadata (name, version, dependencies, extras, the ``lorakern`` command) lives in
pyproject.toml. This file remains for the layout, which pyproject cannot express simply: the Triton code
lives in the top-level ``kernels/`` folder of the repository but installs as ``lorakern.kernels``.
bitsandbytes and transformers import an unrelated package named ``kernels`` whenever one is importable,
so a top-level ``kernels`` package would break them: it must never be installed as one.
"""
from setuptools import find_packages, setup

setup(
    # Every package under lorakern/ (found, so a new subpackage ships without an edit here) and the
    # top-level kernels/ folder mapped onto lorakern.kernels. The include keeps kernels/, tests/ and
    # benchmarks/ from being found as top-level packages.
    packages=find_packages(include=["lorakern", "lorakern.*"]) + ["lorakern.kernels"],
    package_dir={"lorakern.kernels": "kernels"},
    # The harness's fixture sets (GLUE TSVs, SQuAD JSON) and their generator ship with the package.
    package_data={"lorakern.harness": ["fixtures/*.py", "fixtures/glue/*/*.tsv", "fixtures/glue-hard/*/*.tsv",
                                       "fixtures/squad/*.json"],
                  # the C sources of the CPU kernels (LoRA products, NF4 codec), compiled on first use
                  # (lorakern/native/__init__.py)
                  "lorakern.native": ["*.c", "lora_cpu/*.h"]},
)

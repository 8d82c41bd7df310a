"""lorakern: LoRA layers with fused kernels, a float64 reference, and PEFT-compatible adapters.

The Triton code lives in the top-level ``kernels/`` folder of the repository but installs as
``lorakern.kernels``: bitsandbytes and transformers import an unrelated package named ``kernels``
whenever one is importable, so a top-level ``kernels`` package would break them.
"""
from setuptools import setup

setup(
    name="lorakern",
    version="0.1.0",
    description="LoRA layers that cost next to nothing over their frozen base layer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lorakern", "lorakern.core", "lorakern.kernels", "lorakern.harness", "lorakern.native"],
    package_dir={"lorakern.kernels": "kernels"},
    # The harness's fixture sets (GLUE TSVs, SQuAD JSON) and their generator ship with the package.
    package_data={"lorakern.harness": ["fixtures/*.py", "fixtures/glue/*/*.tsv", "fixtures/squad/*.json"],
                  # the CPU NF4 codec's C source, compiled on first use (lorakern/native/__init__.py)
                  "lorakern.native": ["*.c"]},
    install_requires=[
        "numpy>=1.24",
        # Install torch first, pinned (see README): a looser requirement here must be satisfied
        # by the installed CPU build, never pull a new one.
        "torch>=2.1",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "hypothesis>=6.80",
            "pytest-benchmark>=4",
            "peft>=0.14",
            "transformers>=4.40",
            "bitsandbytes>=0.47",
            "loralib>=0.1.2",
            "safetensors>=0.4",
            "matplotlib>=3.5",
            "scikit-learn>=1.2",
            "scipy>=1.10",
            "tqdm>=4.60",
        ],
        "harness": ["transformers>=4.40", "tokenizers>=0.15", "matplotlib>=3.5", "scikit-learn>=1.2", "scipy>=1.10",
                    "tqdm>=4.60"],
        "bench": ["matplotlib>=3.5"],
        "triton": ["triton==3.8.0"],
    },
    entry_points={"console_scripts": ["lorakern=lorakern.cli:main"]},
)

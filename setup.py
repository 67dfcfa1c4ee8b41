"""hgrn-megatron: pretraining HGRN language models with megatron-core and DeepSpeed.

`kernels/`, `tokenizer/` and `pretrain/` live at the top of the repository but install as
subpackages of `hgrn_megatron` (PyPI already has top-level `kernels` and `tokenizer` packages).
"""
from setuptools import setup

SUBPACKAGE_DIRS = {
    "hgrn_megatron": "hgrn_megatron",
    "hgrn_megatron.kernels": "kernels",
    "hgrn_megatron.tokenizer": "tokenizer",
    "hgrn_megatron.pretrain": "pretrain",
}


def find_packages_mapped():
    """Every package under each mapped folder, named under its import root."""
    import os

    packages, package_dir = [], {}
    for name, folder in SUBPACKAGE_DIRS.items():
        package_dir[name] = folder
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(root, folder)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            if pkg in SUBPACKAGE_DIRS and pkg != name:
                continue
            packages.append(pkg)
            package_dir[pkg] = root
    return packages, package_dir


packages, package_dir = find_packages_mapped()

setup(
    name="hgrn-megatron",
    version="0.1.0",
    description="Pretrain HGRN (gated linear RNN) language models at scale: megatron-core TP, DeepSpeed ZeRO, "
    "Triton scans",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"hgrn_megatron": ["export/hf_files/*.py"], "hgrn_megatron.kernels": ["*.cpp"]},
    # torch is listed without a pin: launch/setup_env.sh installs the CPU build (torch==2.13.0) on machines
    # without CUDA *before* this package, so pip never resolves a bare `torch` to a CUDA build there.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "megatron-core>=0.16,<0.20",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "zstandard>=0.22",
        # checkpoint file digests (XXH3-128): memory-speed hashing, where sha256 ran at 1.5 GB/s
        "xxhash>=3.0",
        "tensorboard>=2.15",
        "pyyaml>=6",
        "pydantic>=2.5",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy",
    ],
    # flash-linear-attention: only for the `--format fla` parity test (its HGRNForCausalLM on CPU).
    # lm-eval: hgrn-eval's downstream tasks (lm-evaluation-harness; --shards needs nothing extra); wandb: the
    # optional Weights & Biases sink. The dev extra includes both so the test suite exercises them.
    extras_require={"dev": ["pytest>=8", "ruff>=0.15", "matplotlib>=3.7", "flash-linear-attention>=0.6",
                            "lm-eval>=0.4.9,<0.5", "wandb>=0.18"],
                    "eval": ["lm-eval>=0.4.9,<0.5"],
                    "wandb": ["wandb>=0.18"]},
    entry_points={
        "console_scripts": [
            "hgrn-pretrain=hgrn_megatron.pretrain.__main__:main",
            "hgrn-tokenizer=hgrn_megatron.tokenizer.__main__:main",
            "hgrn-data=hgrn_megatron.pretrain.data.__main__:main",
            "hgrn-export-hf=hgrn_megatron.export.__main__:main",
            "hgrn-checkpoint=hgrn_megatron.pretrain.checkpoint.reshard:main",
            "hgrn-model=hgrn_megatron.__main__:main",
            "hgrn-eval=hgrn_megatron.evaluation.__main__:main",
        ]
    },
)

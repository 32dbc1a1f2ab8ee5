from setuptools import find_packages, setup

setup(
    name="nearl-clip",
    version="0.1.0",
    description="NEARL-CLIP: frozen open_clip + USEformer queries + orthogonal cross-attention, with fused Triton kernels",
    python_requires=">=3.10",
    # The kernels/ and bench/ folders install as nearl_kernels and nearl_bench: "kernels" and
    # "bench" are other projects' names on PyPI (Hugging Face's kernel loader is `kernels`), and a
    # wheel installing them would overwrite theirs. nearl/_checkout.py maps the names onto the
    # folders in a checkout that was never installed.
    packages=find_packages(include=["nearl", "nearl.*"]) + ["nearl_kernels", "nearl_bench"],
    package_dir={"nearl_kernels": "kernels", "nearl_bench": "bench"},
    package_data={"nearl": ["model/model_configs/*.json", "ops/layer_paths/*.json"]},
    # Supported range (README, "Supported versions"): CI runs the whole suite at both ends, the
    # newest pip resolves and the floors below (.ci/oldest.txt). triton < 3.7's interpreter
    # breaks on numpy >= 2.4; kernels/interpreter_shims.py mends it, and CI runs the kernel tests on that pair.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "open_clip_torch>=3.1",  # nearl/towers/open_clip_*.py step tower internals 3.1 introduced
        "transformers>=4.57",  # Hugging Face text towers (BiomedCLIP's PubMedBERT): 4.5x and 5.x are stepped alike
        "nvtx",
        "numpy>=2.0",
        "pillow",
        "tqdm",
        "pydicom>=3.0",
        "scikit-image",
        "matplotlib",
        "safetensors>=0.4",  # shareable adapter files (nearl/store/adapter_files.py)
        "pyyaml",  # a run's config.yaml (nearl/training/config_file.py)
        "scikit-learn>=1.4.2",  # macro-F1 / macro-AUC (nearl/evaluation/metrics.py); 1.4.2 is the first for numpy 2
    ],
    entry_points={"console_scripts": ["nearl-train=nearl.train:cli", "nearl-evaluate=nearl.evaluate:cli",
                                      "nearl-compare=nearl.compare:cli", "nearl-export=nearl.export:cli",
                                      "nearl-predict=nearl.predict:cli"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "tensorboard"],  # tensorboard: tests/training/test_tracking.py
        "gpu": ["xformers"],
        # --report-to tensorboard / wandb (nearl/training/tracking.py)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
)

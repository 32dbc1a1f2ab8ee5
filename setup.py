from setuptools import find_packages, setup

setup(
    name="nearl-clip",
    version="0.1.0",
    description="NEARL-CLIP: frozen open_clip + USEformer queries + orthogonal cross-attention, with fused Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["nearl", "nearl.*", "kernels", "bench"]),
    package_data={"nearl": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "open_clip_torch>=2.24",
        "nvtx",
        "numpy",
        "pillow",
        "tqdm",
        "pydicom>=3.0",
        "scikit-image",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["nearl-train=nearl.train:cli", "nearl-evaluate=nearl.evaluate:main"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
        "gpu": ["xformers"],
    },
)

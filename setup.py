"""chexfound-jax: CheXFound (DINOv2-recipe chest X-ray foundation model) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="chexfound-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of the CheXFound chest X-ray foundation model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["chexfound_jax*", "data_prep*"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.4",
        "orbax-checkpoint>=0.12.8,<0.14",
        "grain>=0.2.18,<0.4",
        "array-record>=0.8.6,<0.10",
        "tensorflow-datasets>=4.9.10,<5",
        "google-crc32c>=1.5,<2",
        "pydicom>=3.0.2,<4",
        "pylibjpeg>=2.1,<3",
        "pylibjpeg-openjpeg>=2.6,<3",
        "pylibjpeg-libjpeg>=2.5,<3",
        "pylibjpeg-rle>=2.2,<3",
        "numpy>=2.0,<3",
        "ml-collections>=1.1,<2",
        "etils[epath]>=1.15,<2",
        "pillow>=11,<14",
        "absl-py>=2,<3",
        "tqdm>=4.60,<5",
        "matplotlib>=3.8,<4",
        "scikit-learn>=1.4,<2",  # L-BFGS of the logreg evaluation (chexfound_jax/eval/feature_workflows.py)
    ],
    extras_require={
        "torch": ["torch>=2.4", "safetensors>=0.4,<1"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "ruff>=0.15,<1", "timm>=1.0.20,<2"],
        "beam": ["apache-beam>=2.60,<3"],
        # libtpu for the installed jax: deviceless TPU compilation (compile_check) and TPU runs.
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    },
)

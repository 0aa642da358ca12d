"""sinkgd-ds: stateless SinkGD / SCALE / SWAN optimizers for DeepSpeed and Megatron-Core."""

from setuptools import find_packages, setup

EXTRAS = {
    "deepspeed": ["deepspeed>=0.19.8"],
    "megatron": ["megatron-core>=0.16.1,<0.20"],  # tested: 0.16.1 (Python 3.11 lane), 0.19.2 (3.12 lane)
    "hf": ["transformers>=5.0", "accelerate>=1.0", "tokenizers>=0.22"],
    "mpi": ["mpi4py>=4.1"],
    "train": ["tqdm", "matplotlib", "tensorboard"],
    "triton": ["triton>=3.6"],  # the GPU backend; on CPU its interpreter runs the backend's tests
    "dev": ["pytest>=8", "hypothesis>=6", "ruff"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="sinkgd-ds",
    version="0.1.0",
    description="Sharded, stateless SinkGD / SCALE / SWAN optimizers for DeepSpeed ZeRO and Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sinkgd_ds", "sinkgd_ds.*", "megatron_patch", "megatron_patch.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require=EXTRAS,
    license="Apache-2.0",
)

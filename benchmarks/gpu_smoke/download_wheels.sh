#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_smoke.py needs on the GPU image, which has Python 3.12, torch 2.11, accelerate,
# peft, transformers and tensorboard but no network. Run it from any machine with PyPI access:
#
#     bash benchmarks/gpu_smoke/download_wheels.sh
#
# then, on the GPU machine (see benchmarks/gpu_smoke.py's docstring):
#
#     python -m pip install --no-index --find-links benchmarks/gpu_smoke/wheels -r benchmarks/gpu_smoke/requirements.txt
#
# Versions and why:
# * torchrl 0.12.0 and tensordict 0.12.4. torchrl's C++ extension links against libtorch; the 0.12.0 wheel was
#   built on 2026-04-27, after torch 2.11 (2026-03-23) and before 2.12, and every libtorch/c10 symbol it
#   imports is defined by torch 2.11.0's libraries. (0.11.1 and 0.13.3 resolve too; 0.14.1 does not.)
#   tensordict's _C.so does not link against libtorch; 0.12.4 is the newest release that torchrl 0.12.0
#   accepts (tensordict>=0.12,<0.13). Neither wheel pins a torch version in its metadata.
# * diffusers 0.37.1 (2026-03-25, the release current with torch 2.11): it accepts huggingface-hub >=0.34,<2,
#   what transformers 4.5x and 5.x both bring; 0.41+ need huggingface-hub >=1.32.
# * hydra-core 1.3.8, omegaconf 2.3.1, gymnasium 1.4.0: pure Python, the versions rl4diffusion is developed with.
#   antlr4-python3-runtime 4.9.3 (hydra's pin, 4.9.*) is published as a source distribution only: its
#   pure-Python wheel is built here.
# * torchvision 0.26.0 (requires torch==2.11.0), installed only if the image has no torchvision.
# * The rest are the dependencies of the above that the image may lack; pip installs only the missing ones.
# rl4diffusion itself is not installed: run with PYTHONPATH=. from the checkout.
set -euo pipefail

dest="$(cd "$(dirname "$0")" && pwd)/wheels"
mkdir -p "$dest"

required=(
  diffusers==0.37.1
  torchrl==0.12.0
  tensordict==0.12.4
  hydra-core==1.3.8
  omegaconf==2.3.1
  gymnasium==1.4.0
  farama-notifications==0.0.6
  cloudpickle==3.1.3
  pyvers==0.2.3
  orjson==3.13.0
  importlib-metadata==10.2.0
  lazy-importer==0.1.0
  zipp==4.1.2
  torchvision==0.26.0
)
if_missing=(  # dependencies of the above that an image built around transformers may or may not have
  requests==2.34.2
  charset-normalizer==3.5.3
  urllib3==2.8.0
  certifi==2026.10.19.post1
  idna==3.20
  httpx==0.28.1
  httpcore==1.0.9
  h11==0.16.0
  anyio==4.16.0
  typing-extensions==4.16.0
  pillow==13.0.0
)

pip download --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "${required[@]}" "${if_missing[@]}"
pip wheel --no-deps --no-binary antlr4-python3-runtime -w "$dest" antlr4-python3-runtime==4.9.3

ls -l "$dest"
du -sh "$dest"

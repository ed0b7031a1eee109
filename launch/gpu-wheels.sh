#!/bin/bash
# Prepares, on a machine with the package registries, everything a lent GPU machine (no network,
# torch 2.11 + CUDA 13, Python 3.12; ../shared/notes/gpu-machine.md) needs to run
# `python -m megagpt.bench gpu` and `pytest -m gpu`. Run from the repository root:
#
#   bash launch/gpu-wheels.sh [--fa4]
#
#   .whl/            megagpt's dependencies the image lacks (../shared/gpu/fetch-wheels.sh: DeepSpeed,
#                    Hydra, webdataset, ...) plus torchao (model.fp8) and torchtitan 0.3.0 (a peer)
#   .fa4/a, .fa4/b   with --fa4: FlashAttention 4 (flash-attn-4 and its CUDA 13 CuTe DSL libraries,
#                    and what they require, 106 MiB) as one tar stream cut in two, because one
#                    device call carries 64 MiB
#
# With --fa4 the device work takes two calls in a row (the machine is given back after 30 s idle):
#   1. carry [".fa4/a"], timeout_s 60:
#        mkdir -p /tmp/fa4 && cp .fa4/a/* /tmp/fa4/ && ls -la /tmp/fa4
#   2. carry [".whl", ".fa4/b"]: the DEVICE COMMAND of megagpt/bench/gpu.py, which joins the parts
#      when .fa4/b is there and installs FlashAttention 4 with the rest.
# Both directories are git-ignored (.git/info/exclude).
set -euo pipefail
[ -d megagpt ] || { echo "run from the repository root" >&2; exit 2; }
PY=${PY:-$(command -v python3)}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

PY="$PY" bash ../shared/gpu/fetch-wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl \
    torchao==0.18.0 torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1

if [ "${1:-}" = "--fa4" ]; then
    grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo '/.fa4/' >> .git/info/exclude
    rm -rf .fa4 && mkdir -p .fa4/wheels .fa4/a .fa4/b
    python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .fa4/wheels \
        flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
        nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
        torch-c-dlpack-ext==0.1.5 \
        nvidia-cutlass-dsl-libs-core==4.8.1 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 einops==0.8.2 \
        protobuf==6.33.6
    # (The last line: what flash-attn-4 and the CuTe DSL libraries require that the image may lack;
    # einops is imported by flash_attn.cute.interface itself.)
    # One tar of the wheels (they are zip-compressed already), cut into 58 MiB + the rest (about
    # 48 MiB): the second call also carries .whl (about 11 MiB); a call carries 64 MiB in all.
    tar cf - -C .fa4 wheels | split -b 58M -d - .fa4/part-
    mv .fa4/part-00 .fa4/a/fa4.tar.part-00
    mv .fa4/part-* .fa4/b/
    for f in .fa4/b/part-*; do mv "$f" ".fa4/b/fa4.tar.${f##*/}"; done
    rm -rf .fa4/wheels
    du -sh .fa4/a .fa4/b
fi
du -sh .whl

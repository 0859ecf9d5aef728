#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels the device machine lacks for scripts/gpu/run.sh and train_demo.sh: pydantic,
# what it needs, for the device's Python 3.12 on x86-64 (its image has torch, transformers, pyyaml, safetensors,
# sentencepiece and tokenizers, and nothing can be downloaded there). Run here, where pip reaches PyPI.
#   scripts/gpu/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl "pydantic>=2.6,<3" pillow
ls .whl

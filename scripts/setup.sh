#!/usr/bin/env bash
# Create or reuse the virtual environment .venv at the repository root and install OFLSAM2.
#   bash scripts/setup.sh          engine + CLI
#   bash scripts/setup.sh --test   ... plus the test tools (pytest, hypothesis, slicer-core, ray, fastapi, uvicorn, trustme)
#   bash scripts/setup.sh --demo   ... plus the demo's sample data package (nilearn)
#   bash scripts/setup.sh --ray    ... plus Ray, for `--executor ray` (batch, experiment)
#   bash scripts/setup.sh --server ... plus FastAPI and uvicorn, for `oflsam2 serve`
# torch goes first (OFLSAM2_TORCH overrides the requirement, e.g. a CUDA build); sam2 is an
# sdist whose metadata pulls torchvision and a CUDA torch, so it is built against the installed
# torch without its dependencies and without the optional CUDA extension.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do  # before any install: a mistyped option costs nothing
  case "$arg" in
    --test) extras="${extras:+$extras,}test" ;;
    --demo) extras="${extras:+$extras,}demo" ;;
    --ray) extras="${extras:+$extras,}ray" ;;
    --server) extras="${extras:+$extras,}server" ;;
    *) echo "unknown option: $arg (use --test, --demo, --ray or --server)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${OFLSAM2_TORCH:-torch==2.13.0}"
"${pip[@]}" numpy SimpleITK "hydra-core>=1.3.2" "iopath>=0.1.10" pillow tqdm safetensors scipy setuptools
.venv/bin/python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation "sam2==1.1.0"
"${pip[@]}" --no-build-isolation -e ".${extras:+[$extras]}"

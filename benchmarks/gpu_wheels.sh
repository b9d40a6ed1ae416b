#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, for `benchmarks/gpu.py` there (issue 23).
#
# That image (Python 3.12; see the device notes) holds torch, torchvision, timm, safetensors, onnx, numpy,
# pillow, typer, rich, click, pyyaml, matplotlib, huggingface_hub, httpx, h11, prometheus-client, regex, tqdm,
# MarkupSafe, annotated-doc, anyio, idna, typing-extensions, setuptools, wheel, pytest and pytest-timeout, but
# not the project's other dependencies. This script downloads those (pinned to the versions the project is tested with) as Python
# 3.12 manylinux x86_64 wheels into .whl/ (ignored by git; under 64 MiB, the device machine's carry limit):
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/*.whl, then prints the total size
#
# On the device machine (the run's `carry: [".whl"]`), from the repository root:
#
#     (python3 -m pip install -q --no-index --find-links .whl $(cat .whl/REQUIREMENTS) \
#        || python3 -m pip install -q --no-index --no-deps .whl/*.whl) \
#       && python3 -m pip install -q --no-deps --no-build-isolation -e .
#
# pip's resolver keeps what the image already has and takes only the missing packages from .whl/ (should the
# image's versions not satisfy it, the wheels go in as they are, --no-deps); the last step installs the project
# itself without touching any dependency. `bash benchmarks/gpu_wheels.sh --check`
# tests that recipe here: a fresh Python 3.12 venv with torch (from local disk) and the image's packages, the
# install line above with no index, then `benchmarks/gpu.py --smoke` (VENV: reuse that venv).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
# Any Python's pip downloads (the target is named by flags); --check needs a real Python 3.12.
PY=${PY:-python3}
PY312=${PY312:-$(PYENV_VERSION=3.12 python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
                 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n 1 || echo python3.12)}

# What the image lacks (top-level requirements, then their dependencies that it lacks too).
TOP=(open_clip_torch==3.3.0 av==18.1.0 SQLAlchemy==2.1.9 alembic==1.20.1 fastapi==0.165.0 uvicorn==0.55.0
     python-multipart==0.0.34 platformdirs==4.14.9)
DEPS=(ftfy==6.3.1 wcwidth==0.9.5 Mako==1.4.3 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.3)

download() {
  mkdir -p "$DEST"
  rm -f "$DEST"/*.whl
  # --no-deps: the image's own packages (torch above all) must not be fetched; every missing one is named.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${TOP[@]}" "${DEPS[@]}"
  printf '%s\n' "${TOP[@]}" >"$DEST/REQUIREMENTS"
  local bytes
  bytes=$(du -cb "$DEST" | tail -n 1 | cut -f1)
  echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((bytes / 1024 / 1024)) MiB in $DEST/"
  if [ "$bytes" -ge $((64 * 1024 * 1024)) ]; then
    echo "over the device machine's 64 MiB carry limit" >&2
    exit 1
  fi
}

check() {
  # A venv shaped like the device image: torch from local disk, then the image's packages the project uses.
  local venv=${1:-}
  [ -n "$venv" ] || venv=$(mktemp -d)/py312
  [ -x "$venv/bin/python" ] || "$PY312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$venv/bin/python" -m pip install -q timm safetensors onnx numpy pillow typer rich click pyyaml matplotlib \
    huggingface_hub httpx prometheus-client regex tqdm MarkupSafe annotated-doc anyio idna h11 pytest pytest-timeout \
    setuptools wheel
  # typer pulls pydantic in here; the image has neither pydantic nor the packages fastapi needs: drop them.
  "$venv/bin/python" -m pip uninstall -q -y pydantic pydantic_core annotated-types typing-inspection
  # The device recipe, with no index and no pip configuration: only the wheels in .whl/ may be installed.
  (unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT; export PIP_CONFIG_FILE=/dev/null
   "$venv/bin/python" -m pip install -q --no-index --find-links "$DEST" $(cat "$DEST/REQUIREMENTS") \
     && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .)
  "$venv/bin/python" -m pip check || true  # report only: the image's own versions are not ours to pin
  "$venv/bin/python" benchmarks/gpu.py --smoke --out "$(mktemp -d)/gpu-smoke"
  echo "recipe ok in $venv"
}

case "${1:-}" in
  "") download ;;
  --check) check "${2:-}" ;;
  *) echo "usage: bash benchmarks/gpu_wheels.sh [--check [VENV]]" >&2; exit 2 ;;
esac

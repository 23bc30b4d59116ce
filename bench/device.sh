#!/usr/bin/env bash
# The GPU figures of issues 15 and 16 in one run on a lent device machine (an H100 or H200 with
# 16 cores): download on one core and on all, decode, ViT-B-32 embedding and CoCa captions model
# only and end to end, and the one-pass run, written to $OUT/device.json.
#
# The device image has torch, pyarrow, numpy, pillow, httpx, timm and nvidia-ml-py but not
# clipgram's own dependencies, and it reaches no registry. So, here, once:
#     bash bench/device.sh wheels     # the missing packages as cp312 wheels in .whl/ (ignored by git)
# then, with the `device` tool:
#     run(command="bash bench/device.sh", carry=[".whl"], timeout_s=600)
# clipgram itself is installed there from the working tree, so the run measures this checkout.
# On a host without a GPU (and with .venv) the same command runs the CPU path at a small size.
set -euo pipefail
cd "$(dirname "$0")/.."

# what the device image lacks, pinned to the versions pyproject.toml and .venv agree on; the
# transformers open_clip's generate() needs (< 4.56) wants a hub and tokenizers of its own age
WHEELS=(duckdb==1.5.5 duckdb-extension-fts==1.5.5 duckdb-extension-vss==1.5.5 open_clip_torch==3.3.0
        ftfy==6.3.1 wcwidth==0.9.5 instaloader==4.16 transformers==4.45.2 tokenizers==0.20.3
        huggingface_hub==0.36.2)

if [ "${1:-}" = wheels ]; then
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-out/device}
mkdir -p "$OUT"
PYTHON=python3
if [ -d .whl ]; then
    # install into a folder of its own: the image's packages stay as they are
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python \
        --no-compile --target /tmp/site .
    export PYTHONPATH=/tmp/site:$PWD
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5  # a log that fits the device tool's tail

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi: a host without an NVIDIA GPU"; nproc; free -g; } | tee "$OUT/host.txt"
if $PYTHON -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    SIZES=()  # the bench's GPU defaults: 8,000 URLs, 1,024 images embedded, 512 captioned
else
    SIZES=(--images 400 --distinct 200 --embed-images 64 --caption-images 16)
fi
# 8 minutes: a device call is at most 10, and the tool's 15 minutes a task must leave room for a rerun
timeout 480 $PYTHON -m bench.throughput --models-only "${SIZES[@]}" --out "$OUT/device.json" \
    2>&1 | tee "$OUT/log.txt"

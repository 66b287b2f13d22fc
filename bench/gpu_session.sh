#!/usr/bin/env bash
# Issue 6's GPU targets in one device call, for a session that is lent a GPU machine.
#
#   bash bench/gpu_session.sh prepare   # here, on the CPU machine: fills .gpu/ and .whl/ (ignored)
#   device run, carry [".gpu", ".whl"], timeout_s 600:  bash bench/gpu_session.sh run
#   bash bench/gpu_session.sh prepare gptj, then a second device call:  ... run-gptj
#
# Checked here on CPU with the image's versions (torch aside) and TINY=1 PYTHON=<that venv>.
#
# The GPU machine is bare and offline: its image's python3 has torch, transformers, accelerate,
# peft and tokenizers (KINDS.md in the device tool's folder), not finetune's install, nor
# ../shared. `prepare` copies the corpus and the anchor script into .gpu/ so that they travel.
# `run` measures, in this order, each under its own time limit so that a slow step leaves the
# others' figures in $OUT: finetune against the run_clm baseline for GPT-2 124M and GPT-Neo 125M,
# GPT-Neo compiled, GPT-2 without vocabulary padding, then the anchor's hand-written loop (the
# ≥ 1.3× comparison must be on the same card in the same session). GPT-J 6B 4-bit needs
# bitsandbytes wheels carried and 12 GB of random weights saved first: `run-gptj`, a second call.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
SHARED=../shared
PYTHON=${PYTHON:-python3} # the image's python3 holds torch
TINY=${TINY:+--tiny}      # TINY=1: the same plan with tiny models, to check this script on a CPU

case "${1:-}" in
prepare)
    mkdir -p "$GPU"
    grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >>.git/info/exclude
    cp "$SHARED/data/tinyshakespeare.txt" "$SHARED/bench/anchor_gpu.py" "$GPU/"
    # The image's transformers (5.17 when last read) predates `activation_checkpointing` (5.23):
    # carry the version this project is tested with. It needs nothing the image lacks.
    mkdir -p .whl
    grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >>.git/info/exclude
    version=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "transformers==$version"
    if [ "${2:-}" = gptj ]; then # the `gpu` extra, for run-gptj: 44 MB of the 64 MiB a call carries
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
            --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
            bitsandbytes liger-kernel
    fi
    echo "prepared $GPU: $(ls "$GPU" | tr '\n' ' '); .whl: $(ls .whl | tr '\n' ' ')"
    ;;
run | run-gptj)
    : "${OUT:?run this through the device tool, which sets OUT}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
    if ! ls .whl/transformers-*.whl >/dev/null 2>&1 || [ ! -f "$GPU/tinyshakespeare.txt" ]; then
        echo "gpu_session: run 'bash bench/gpu_session.sh prepare' here and carry .gpu and .whl" >&2
        exit 2
    fi
    # Wheels for what the image lacks or has too old (transformers; bitsandbytes, liger-kernel).
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
    {
        nvidia-smi -L || echo "no nvidia-smi"
        "$PYTHON" -c 'import torch, transformers, accelerate, peft, tokenizers as t
print("torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "peft", peft.__version__, "tokenizers", t.__version__)'
    } 2>&1 | tee "$OUT/environment.txt"
    targets=("$PYTHON" bench/gpu_targets.py $TINY --corpus "$GPU/tinyshakespeare.txt" --out "$OUT")
    if [ "$1" = run ]; then
        timeout 400 "${targets[@]}" --only gpt2,gpt_neo,gpt_neo_compiled,gpt2_unpadded \
            --steps 20 --warmup 10 \
            2>&1 | tee "$OUT/targets.log"
        timeout 150 "$PYTHON" "$GPU/anchor_gpu.py" $TINY --out "$OUT" \
            --only raw_compiled_loop_bf16_bs16,trainer_runclm_defaults_fp32_bs8 \
            2>&1 | tee "$OUT/anchor.log"
    else
        timeout 540 "${targets[@]}" --only gptj,gptj_bf16 --steps 10 --warmup 3 \
            2>&1 | tee "$OUT/targets.log"
    fi
    ;;
*)
    echo "usage: bash bench/gpu_session.sh prepare [gptj] | run | run-gptj" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Issue 19's GPU measurements in one run: <= 10 minutes on one H200 (about 6 expected).
#
#   bench/gpu_issue19.sh            # CUDA, full sizes; output also in bench/gpu_issue19.log
#   bench/gpu_issue19.sh --smoke    # the same scripts on the CPU at tiny sizes (checks the plumbing)
#
# Needs the project's environment (`make` builds .venv; PYTHON=... to use another interpreter).
# Each part has its own time limit, so one slow or failing part does not take the others with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export PYTHONPATH="$PWD/plugin${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
LOG=bench/gpu_issue19$([ $SMOKE = 1 ] && echo _smoke).log
: > "$LOG"

part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2; shift 2
    echo "=== $title: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "_pytree.py" -e "^W1203" | tee -a "$LOG"
    echo "=== $title: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$LOG"
}

if [ $SMOKE = 1 ]; then
    part 120 numerics        "$PY" bench/numerics.py --device cpu --smoke
    part 300 loss_memory     "$PY" bench/loss_memory.py --device cpu --tokens 512 --hidden 64 --vocab 4096 --reps 1
    part 300 step_time       "$PY" bench/step_time.py --device cpu --preset 1b --smoke --steps 2
    part 300 kl              "$PY" bench/kl.py --device cpu --preset tiny --steps 1 --rounds 1 --variants im_lora kl_adapter
else
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -c \
      "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; \
      "$PY" -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('cut_cross_entropy', 'liger_kernel')})"; } 2>&1 | tee -a "$LOG"
    # bf16 head gradient over 128 chunks (32k tokens / 256) vs float64: the CUDA accumulation path
    part 90  numerics        "$PY" bench/numerics.py --device cuda
    # loss fwd+bwd, 32k tokens, d 4096, V 128k: stock HF, logits, chunked, cce and Liger when importable
    part 180 loss_memory     "$PY" bench/loss_memory.py --device cuda --tokens 32768 --hidden 4096 --vocab 128256 --reps 3
    # ~1.1B Llama, 8 x 2048 tokens, V 128k: step time and peak vs stock HF (targets <= 1.0x, <= 0.25x)
    part 180 step_time       "$PY" bench/step_time.py --device cuda --preset 1b --steps 5
    # KL adapter vs IM on the same model and batch (target <= 1.3x)
    part 150 kl              "$PY" bench/kl.py --device cuda --preset 1b --vocab 128256 --batch 8 --steps 3 --rounds 1 \
                                 --variants im_lora kl_adapter
fi
echo "log: $LOG"

#!/usr/bin/env bash
# The GPU check, in two calls on a machine with CUDA (README, "On a GPU"; docs/benchmark.md, "One H200"):
#
#   bash bench_gpu.sh tests   # the test suite with CUDA present (the tests parametrise over DEVICES)
#   bash bench_gpu.sh bench   # a GPU-scale student and its figures (below)
#
# bench: (1) one KL and one hidden-state step timed, so that (2) the student of CONFIG
# (configs/gpu.json: K = 1024 merges, bf16 autocast) trains TRAIN_S seconds, 30% of them
# hidden-state steps and 70% KL steps; (3) teacher and student generate on bench_tasks
# (batched) and are paired (run_bench.py codegen, rows); (4) characters/s of student and
# teacher at batch 1, turn about; (5) the KL step against the CE step on the same windows,
# and transformers + peft's CE step where both are installed; (6) characters/s with all 155
# prompts in one batch, and a profile of the KL step.
# Every stage logs to $OUT/bench.log and keeps going when one fails; $OUT/results.tgz
# holds the run's JSON files after each stage, so a run cut short still returns figures.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/gpu-check}
CONFIG=${CONFIG:-configs/gpu.json}
RUN=${RUN:-runs/gpu}
TRAIN_S=${TRAIN_S:-100}  # seconds of training steps
N_SPEED=${N_SPEED:-5}  # prompts decoded at batch 1
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUN"
LOG="$OUT/bench.log"

stage() {  # stage NAME COMMAND...: run, log, time; never stop the script
    local name=$1
    shift
    local t0=$SECONDS
    echo "=== $name: $* ($(date -u +%T))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    tar -czf "$OUT/.results.tgz" --exclude='*.pt' "$RUN" "$OUT"/*.json 2>/dev/null
    mv "$OUT/.results.tgz" "$OUT/results.tgz"  # whole or not at all, should the call end here
    return 0
}

setting() {  # setting FIELD: the value of FIELD in CONFIG, or its default
    python -c "import sys, kld; print(getattr(kld.load_config(sys.argv[1]), sys.argv[2]))" "$CONFIG" "$1"
}

if [ "${1:-bench}" = tests ]; then
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/tests.log"
    timeout "${TESTS_S:-170}" python -m pytest -v -rfE -p no:cacheprovider test_kld.py 2>&1 | tee -a "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    echo
    echo "pytest exit $rc (124: cut at ${TESTS_S:-170} s); passed $(grep -c ' PASSED' "$OUT/tests.log"), failed" \
        "$(grep -c ' FAILED' "$OUT/tests.log"), errors $(grep -c ' ERROR' "$OUT/tests.log"), with cuda in their id" \
        "and passed $(grep -c '\[.*cuda.*\] PASSED' "$OUT/tests.log")" | tee -a "$OUT/tests.log"
    exit "$rc"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
B=$(setting batch_size)
L=$(setting seq_len)
K=$(setting n_merges)
# (1) the step times that size the schedule: the extension learned as the run will learn it
rm -f "$OUT/probe.json"
stage probe python run_bench.py train-speed --model "$(setting model)" --corpus "$(setting corpus)" --n-merges "$K" \
    --batch-sizes "$B" \
    --seq-len "$L" --objectives hidden kl --steps 3 --windows "$(setting windows)" --loss-chunk "$(setting loss_chunk)" \
    --json "$OUT/probe.json"
read -r HIDDEN STEPS < <(python -c "
import json, sys
t = json.load(open(sys.argv[1]))
budget, b = float(sys.argv[2]), sys.argv[3]
print(max(10, min(2000, int(0.3 * budget / t['hidden ' + b]))), max(10, min(2000, int(0.7 * budget / t['kl ' + b]))))
" "$OUT/probe.json" "$TRAIN_S" "$B" 2>/dev/null || echo "$(setting hidden_steps) $(setting steps)")
echo "schedule: $HIDDEN hidden-state steps, then $STEPS KL steps" | tee -a "$LOG"
# (2) the student
stage train python kld.py --config "$CONFIG" --out_dir "$RUN" --hidden_steps "$HIDDEN" --steps "$STEPS"
# (3) code generation: the teacher, the student, paired
N_NEW=$(setting max_new_tokens)
stage teacher-codegen python run_bench.py codegen --config "$CONFIG" --out "$RUN/teacher-codegen.json" \
    --max-new-tokens "$N_NEW"
stage student-codegen python run_bench.py codegen --run "$RUN" --max-new-tokens "$N_NEW"
stage rows python run_bench.py rows "$RUN" --teacher "$RUN/teacher-codegen.json"
# (4) generation speed, student against teacher, turn about, at batch 1
stage speed-batch1 python run_bench.py gen-speed --run "$RUN" --n-tasks "$N_SPEED" --batch-size 1 --rounds 2 \
    --max-new-tokens "$N_NEW"
# (5) the KL step against the CE step (and peft's), the same windows, one process
PEFT=$(python -c "import peft, transformers" 2>/dev/null && echo --peft)
stage step-time python run_bench.py train-speed --run "$RUN" --batch-sizes "$B" --seq-len "$L" --objectives kl ce \
    --steps 5 --loss-chunk "$(setting loss_chunk)" $PEFT
# (6) generation speed with the 155 prompts in one batch; where the KL step's time goes
stage speed-batch155 python run_bench.py gen-speed --run "$RUN" --n-tasks 155 --batch-size 155 --rounds 2 \
    --max-new-tokens "$N_NEW"
stage profile python run_bench.py train-speed --run "$RUN" --batch-sizes "$B" --seq-len "$L" --objectives kl \
    --steps 2 --loss-chunk "$(setting loss_chunk)" --profile
echo "=== done after $SECONDS s" | tee -a "$LOG"

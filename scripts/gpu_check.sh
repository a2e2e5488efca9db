#!/usr/bin/env bash
# One GPU host, one go: `fit` on the embedded dataset at 512² (bf16 + channels_last by default) and a study of
# 8 trials on fractional GPUs, with the GPU's utilisation sampled every 0.5 s. Writes logs to ${OUT:-./gpu_check}.
# Usage: scripts/gpu_check.sh [python]
set -uo pipefail
py=${1:-python3}
out=${OUT:-./gpu_check}; mkdir -p "$out"
export RAYSEGTRAIN_CACHE=${RAYSEGTRAIN_CACHE:-/tmp/raysegtrain-cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
data="data.synthetic.size=512 data.image_size=512 data.synthetic.num_train=512 data.synthetic.num_val=64"
work=$(mktemp -d); cd "$work"

# prepare the dataset once (both runs share the cache), so its generation is not in the timings
$py -c "from raysegtrain import config; from raysegtrain.data.synthetic import cached_root as c; \
print(c(config.load(None, '$data'.split()).data.synthetic))"

nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$out/util_fit.txt" &
smi=$!
t0=$(date +%s)
$py -m raysegtrain fit $data train.epochs=4 train.batch_size=32 --no-progress 2>&1 | tee "$out/fit.log"
echo "fit wall s: $(( $(date +%s) - t0 ))" | tee -a "$out/fit.log"
kill $smi

nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$out/util_tune.txt" &
smi=$!
t0=$(date +%s)
$py -m raysegtrain tune "$OLDPWD/search_spaces/arch_encoders.yaml" $data budget.num_samples=8 \
  max_concurrent_trials=4 asha.max_epochs=4 asha.grace_period=1 asha.reduction_factor=2 trial.cpus_per_worker=3 \
  data.loader_workers=3 train.batch_size=16 --no-progress 2>&1 | tee "$out/tune.log"
echo "tune wall s: $(( $(date +%s) - t0 ))" | tee -a "$out/tune.log"
kill $smi
$py - "$out" <<'PY'
import sys, statistics, pathlib, sqlite3, glob
out = pathlib.Path(sys.argv[1])
for name in ("fit", "tune"):
    vals = [float(v) for v in (out / f"util_{name}.txt").read_text().split() if v.strip()]
    busy = sum(v > 0 for v in vals) / max(1, len(vals))
    print(f"{name}: GPU samples {len(vals)}, mean utilisation {statistics.mean(vals or [0]):.1f}%, busy share {busy:.2f}")
db = glob.glob("mlflow.db")
if db:
    con = sqlite3.connect(db[0])
    rows = con.execute("select value from metrics where key='trial_startup_s'").fetchall()
    if rows:
        s = sorted(r[0] for r in rows)
        print(f"per-trial start-up s: n={len(s)} median {statistics.median(s):.1f} min {s[0]:.1f} max {s[-1]:.1f}")
    for k in ("images_per_s",):
        r = con.execute(f"select max(value) from metrics where key='{k}'").fetchone()
        print(k, "max over runs", r)
PY

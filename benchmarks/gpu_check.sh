#!/usr/bin/env bash
# GPU check on a machine with one NVIDIA GPU (run from the repository root):
#  1. the OR/AND example through mosaicd with --gpus 0 --runs-per-gpu 2 (need_gpu = true);
#     with the resource figures the runs recorded on the GPU (CUDA time, peak memory, energy);
#  2. the training-loop ratio on cuda, with GPU utilisation sampled by nvidia-smi.
# Writes its report to ${OUT:-/tmp/gpu-check}. Needs torch with CUDA, pyzmq, msgpack, psutil;
# pynvml (optional, `pip install nvidia-ml-py`) for the energy figure.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
W=$(mktemp -d /tmp/mosgpu-XXXX)
export MOSAIC_SOCKET=$W/d.sock MOSAIC_STATE_DIR=$W/state
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} > "$OUT/gpu_check.txt" 2>&1

sed -e 's/^need_gpu = false/need_gpu = true/' -e 's/^gpu_available = None/gpu_available = 0/' \
    examples/or_mlp/config.ini > "$W/config.ini"
cp examples/or_mlp/*.py "$W/"
$PY -m mosaicd --workers 0 --gpus 0 --runs-per-gpu 2 > "$W/mosaicd.log" 2>&1 &
DAEMON=$!
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 200 \
    > "$OUT/smi_sweep.csv" 2>&1 &
SMI=$!
T0=$(date +%s.%N)
(cd "$W" && $PY -m mosaic_client.cli run config.ini gpu.db --follow) >> "$OUT/gpu_check.txt" 2>&1
echo "sweep wall $(echo "$(date +%s.%N) - $T0" | bc) s" >> "$OUT/gpu_check.txt"
kill $SMI
{
  echo "--- status"
  $PY -m mosaic_client.cli status --limit 3
  echo "--- worker environments"
  for pid in $(pgrep -P $DAEMON); do
    tr '\0' '\n' < /proc/$pid/environ | grep -E '^(CUDA_VISIBLE_DEVICES|MOSAIC_WORKER_SLOT)=' \
      | tr '\n' ' '; echo "(pid $pid)"
  done
  echo "--- database"
  $PY - "$W/gpu.db" <<'PYEOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print("integrity", c.execute("PRAGMA integrity_check").fetchone()[0])
print("states", c.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
print("slots", c.execute("SELECT substr(detail, 1, 12), count(*) FROM run_events "
                         "WHERE to_status='running' GROUP BY 1").fetchall())
print("mean test_acc", c.execute("SELECT avg(test_acc) FROM run_results").fetchone()[0])
# Issue 26: the GPU's own figures of this study (CUDA event time, CUDA peak allocated, NVML
# energy: NULL on a CPU, and energy NULL without pynvml or on a card without the counter).
print("resources (flops, train s, cpu s, peak MiB, latency ms, per s, energy J)",
      c.execute("SELECT flops_per_sample, train_seconds, cpu_seconds, peak_memory_mb, latency_ms, "
                "throughput_per_s, energy_j FROM run_results ORDER BY run_id LIMIT 3").fetchall())
print("measured (device, memory, gpu s/epoch, load, members)",
      c.execute("SELECT device, memory_method, gpu_seconds, load_1m, members "
                "FROM run_measurements ORDER BY run_id LIMIT 3").fetchall())
print("runs with CUDA time / energy",
      c.execute("SELECT count(gpu_seconds) FROM run_measurements").fetchone()[0],
      c.execute("SELECT count(energy_j) FROM run_results").fetchone()[0])
PYEOF
  echo "--- peak GPU utilisation / memory during the sweep"
  sort -t, -k1 -n "$OUT/smi_sweep.csv" | tail -1
} >> "$OUT/gpu_check.txt" 2>&1
$PY -m mosaic_client.cli shutdown >> "$OUT/gpu_check.txt" 2>&1
wait $DAEMON

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 100 \
    > "$OUT/smi_loop.csv" 2>&1 &
SMI=$!
# Small batches (the issue's 50 epochs x 200 batches), then large ones that keep the card busy.
$PY benchmarks/training_loop.py --device cuda --epochs 50 --batches 200 --repeat 2 \
    --batch-size 64 2>&1 | grep -v '^\[mosaic\]' >> "$OUT/gpu_check.txt"
$PY benchmarks/training_loop.py --device cuda --epochs 20 --batches 25 --repeat 1 \
    --batch-size 4096 2>&1 | grep -v '^\[mosaic\]' >> "$OUT/gpu_check.txt"
kill $SMI
awk -F, '{gsub(/ %/,"",$1); s+=$1; n++} END {printf "mean GPU utilisation during the loops: %.0f %%\n", s/n}' \
    "$OUT/smi_loop.csv" >> "$OUT/gpu_check.txt"
cat "$OUT/gpu_check.txt"

#!/usr/bin/env bash
# GPU benchmark in one go, for a machine with an NVIDIA GPU, CUDA 13 / cuDNN 9 and Python with
# numpy + onnx:
#   1. checks the CUDA execution provider against the CPU one on the reference bundle
#      (`retoucher run examples/jobs.jsonl` on both; statuses, regions and pixels compared);
#   2. builds the benchmark bundle (models/bench/generate.py; fp32, and fp16 with FP16=1);
#   3. runs `retoucher bench --device cuda` with dynamic batching and with batch size 1.
# Results go to $OUT (default out/gpu): gpu.txt, cuda-vs-cpu.txt, bench-*.json, bench-*.txt.
#
# The binary: $RETOUCHER_BIN, else .gpu/bin/retoucher.xz (unpacked to /tmp), else
# target/release/retoucher (cargo build --release --features cuda). ONNX Runtime's CUDA build:
# .gpu/ort/env.sh when present (../shared/gpu/pack-ort-cuda.sh makes it), else a copy already
# unpacked in /tmp/ort by an earlier call, else ORT_DYLIB_PATH. The two travel separately when
# they do not fit one transfer: `GPU_STEP=prepare` unpacks ONNX Runtime and builds the bundles.
# Knobs: JOBS (default 384), CONCURRENCY (96), IMAGE_SIZE (512), FP16 (0/1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
JOBS=${JOBS:-384}
CONCURRENCY=${CONCURRENCY:-96}
IMAGE_SIZE=${IMAGE_SIZE:-512}
mkdir -p "$OUT"

bin=${RETOUCHER_BIN:-}
if [[ -z "$bin" && -f .gpu/bin/retoucher.xz ]]; then
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
        .gpu/bin/retoucher.xz /tmp/retoucher
    chmod +x /tmp/retoucher
    bin=/tmp/retoucher
fi
bin=${bin:-target/release/retoucher}
if [[ -f .gpu/ort/env.sh ]]; then
    # shellcheck source=/dev/null
    source .gpu/ort/env.sh
elif [[ -s /tmp/ort/libonnxruntime.so ]]; then
    nv=$(python3 -c 'import glob,os,nvidia; print(":".join(d for r in nvidia.__path__ for d in sorted(glob.glob(os.path.join(r,"*","lib")))))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="/tmp/ort:${nv}:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so
fi
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the onnxruntime-gpu library, or provide .gpu/ort}"

build_bundles() {
    [[ -s /tmp/bench-fp32/bundle.toml ]] ||
        python3 models/bench/generate.py /tmp/bench-fp32 --image-size "$IMAGE_SIZE" --no-check
    if [[ "${FP16:-0}" == 1 && ! -s /tmp/bench-fp16/bundle.toml ]]; then
        python3 models/bench/generate.py /tmp/bench-fp16 --image-size "$IMAGE_SIZE" --fp16 --no-check
    fi
}
if [[ "${GPU_STEP:-all}" == prepare ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    ls -la /tmp/ort
    build_bundles
    exit 0
fi

echo "==> GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$bin" --version | tee -a "$OUT/gpu.txt"

echo "==> CUDA vs CPU on the reference bundle"
rm -rf /tmp/ex-cuda /tmp/ex-cpu
("$bin" run examples/jobs.jsonl --out /tmp/ex-cuda --device cuda 2>&1 || echo "exit status $?") | tail -n 7
("$bin" run examples/jobs.jsonl --out /tmp/ex-cpu --device cpu 2>&1 || echo "exit status $?") | tail -n 2
python3 - /tmp/ex-cuda /tmp/ex-cpu <<'PY' | tee "$OUT/cuda-vs-cpu.txt"
import json, os, sys
import numpy as np
from PIL import Image
a, b = sys.argv[1], sys.argv[2]
worst = 0
for job in sorted(d for d in os.listdir(a) if os.path.isdir(os.path.join(a, d))):
    da = json.load(open(os.path.join(a, job, "diagnostics.json")))
    db = json.load(open(os.path.join(b, job, "diagnostics.json")))
    ra = sum(len(i["regions"]) for i in da["iterations"])
    rb = sum(len(i["regions"]) for i in db["iterations"])
    ia = np.asarray(Image.open(os.path.join(a, job, "retouched.png")), dtype=np.int16)
    ib = np.asarray(Image.open(os.path.join(b, job, "retouched.png")), dtype=np.int16)
    diff = int(np.abs(ia - ib).max())
    worst = max(worst, diff)
    smax = abs(da["iterations"][0]["saliency"]["max"] - db["iterations"][0]["saliency"]["max"])
    print(f"{job}: cuda {da['status']}/{ra} regions, cpu {db['status']}/{rb} regions, "
          f"saliency max diff {smax:.2e}, max pixel diff {diff}")
    assert da["status"] == db["status"] and ra == rb, job
print(f"max pixel difference over all jobs: {worst}")
PY

bench() {
    local name=$1 bundle=$2
    shift 2
    echo "==> bench $name"
    "$bin" bench --bundle "$bundle" --device cuda --jobs "$JOBS" --concurrency "$CONCURRENCY" \
        --image-size "$IMAGE_SIZE" "$@" --json > "$OUT/bench-$name.json"
    python3 - "$OUT/bench-$name.json" <<'PY' | tee "$OUT/bench-$name.txt"
import json, sys
r = json.load(open(sys.argv[1]))
for run in r["runs"]:
    print(f"[{run['label']}] {run['jobs_per_s']:.1f} jobs/s, p50 {run['latency']['p50_ms']:.0f} ms, "
          f"p95 {run['latency']['p95_ms']:.0f} ms, p99 {run['latency']['p99_ms']:.0f} ms, "
          f"model-only {run['model_only_jobs_per_s']:.1f} jobs/s, "
          f"e2e/model-only {run['end_to_end_over_model_only']:.2f}")
    for m, s in run["models"].items():
        print(f"   {m}: mean batch {s['mean_batch_size']:.1f}, {s['items_per_job']:.2f}/job, "
              f"inference {s['mean_inference_ms']:.1f} ms, model-only {s['model_only_items_per_s']:.0f} items/s @ b{s['model_only_batch_size']}")
    print("   stages ms:", {k: round(v, 1) for k, v in run["stages_ms"].items()})
    cpu = run.get("cpu")
    if cpu:
        print(f"   CPU {cpu['process_s']:.1f} s ({100 * cpu['utilisation']:.0f}% of {r['cpus']} cores), "
              f"model threads {cpu['model_threads_s']:.1f} s, outside them {cpu['host_ms_per_job']:.1f} ms/job "
              f"(host ceiling {cpu['host_ceiling_jobs_per_s']:.0f} jobs/s); by thread "
              + ", ".join(f"{k} {v:.1f}" for k, v in cpu["threads_s"].items() if v >= 0.05))
if r.get("dynamic_over_batch_1"):
    print(f"dynamic / batch-1 = {r['dynamic_over_batch_1']:.2f}")
PY
}

echo "==> building the benchmark bundles"
build_bundles
bench fp32 /tmp/bench-fp32 --compare-batch-1
if [[ "${FP16:-0}" == 1 ]]; then
    bench fp16 /tmp/bench-fp16 --compare-batch-1
fi
echo "==> done: $OUT"

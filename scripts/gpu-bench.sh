#!/usr/bin/env bash
# GPU benchmark in one go, for a machine with an NVIDIA GPU, CUDA 13 / cuDNN 9 and Python with
# numpy + onnx:
#   1. checks the CUDA execution provider against the CPU one on the reference bundle
#      (`retoucher run examples/jobs.jsonl` on both; statuses, regions and pixels compared);
#   2. builds the benchmark bundle (models/bench/generate.py; fp32, and with FP16=1 the generator's
#      fp16 one plus models/export/fp16.py's conversion of the fp32 one with ORT's fused attention);
#   3. runs `retoucher bench --device cuda` with dynamic batching and with batch size 1, once
#      without IO binding (models.io_binding=run), and once with the model-only phase at batch 32;
#   4. the PyTorch eager bf16 baseline of the same perception graph (models/bench/torch_baseline.py)
#      when python3 has torch with CUDA (the device cannot install it: no PyPI, 64 MiB per call);
#      otherwise torch-bf16.json says so and the ORT fp32 model-only figure is the baseline.
# Results go to $OUT (default out/gpu): gpu.txt, cuda-vs-cpu.txt, bench-*.json, bench-*.txt,
# fp16-ort.txt/.json (the conversion report), torch-bf16.json, summary.txt (perception model-only
# at batch 32, ORT vs torch bf16, and their ratio).
#
# The binary: $RETOUCHER_BIN, else .gpu/bin/retoucher.xz (unpacked to /tmp), else
# target/release/retoucher (cargo build --release --features cuda). ONNX Runtime's CUDA build:
# .gpu/ort/env.sh when present (../shared/gpu/pack-ort-cuda.sh makes it), else a copy already
# unpacked in /tmp/ort by an earlier call, else ORT_DYLIB_PATH. The two travel separately when
# they do not fit one transfer: `GPU_STEP=prepare` unpacks ONNX Runtime and builds the bundles.
# Knobs: JOBS (default 384), CONCURRENCY (96), IMAGE_SIZE (512), FP16 (0/1), JOBS_B32 (256, the
# batch-32 run), TORCH_SECONDS (5, timed seconds per torch batch size).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
JOBS=${JOBS:-384}
CONCURRENCY=${CONCURRENCY:-96}
IMAGE_SIZE=${IMAGE_SIZE:-512}
JOBS_B32=${JOBS_B32:-256}
TORCH_SECONDS=${TORCH_SECONDS:-5}
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
    if [[ "${FP16:-0}" == 1 && ! -s /tmp/bench-fp16-ort/bundle.toml ]]; then
        # fp16.py: ORT's float16 converter + transformer fusions, checked on the CPU against fp32
        # (needs python3 >= 3.11 with onnxruntime; without sympy it converts without fusing)
        if python3 -c 'import sys, onnxruntime.transformers.float16; assert sys.version_info >= (3, 11)' 2>/dev/null; then
            python3 models/export/fp16.py /tmp/bench-fp32 /tmp/bench-fp16-ort --batch 1 --threads "$(nproc)" \
                --report "$OUT/fp16-ort.json" 2>&1 | tee "$OUT/fp16-ort.txt" ||
                echo "fp16.py failed (exit status $?)" | tee -a "$OUT/fp16-ort.txt"
        else
            echo "fp16.py not run: python3 lacks onnxruntime (Python package) or is older than 3.11" |
                tee "$OUT/fp16-ort.txt"
        fi
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
# The same load without IO binding (plain runs over the same pinned staging buffers): what the
# binding itself buys.
bench fp32-no-binding /tmp/bench-fp32 --set models.io_binding=run
if [[ "${FP16:-0}" == 1 ]]; then
    bench fp16 /tmp/bench-fp16 --compare-batch-1
    if [[ -s /tmp/bench-fp16-ort/bundle.toml ]]; then
        bench fp16-ort /tmp/bench-fp16-ort --compare-batch-1
    fi
fi

# Model-only at batch 32 (--model-only-batch-size 32, every model's max_batch_size 32);
# summary.txt prints the size used.
b32() {
    local name=$1 bundle=$2
    JOBS=$JOBS_B32 CONCURRENCY=128 bench "$name-b32" "$bundle" --max-batch-size 32 --model-only-batch-size 32
}
b32 fp32 /tmp/bench-fp32
if [[ "${FP16:-0}" == 1 ]]; then
    b32 fp16 /tmp/bench-fp16
    if [[ -s /tmp/bench-fp16-ort/bundle.toml ]]; then
        b32 fp16-ort /tmp/bench-fp16-ort
    fi
fi

echo "==> PyTorch eager bf16 baseline of the perception graph"
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    python3 models/bench/torch_baseline.py /tmp/bench-fp32 --device cuda --dtype bf16 --batch-sizes 1,8,32 \
        --seconds "$TORCH_SECONDS" --json "$OUT/torch-bf16.json" ||
        echo "torch_baseline.py failed (exit status $?)"
else
    why=$(python3 -c 'import torch; print(f"torch {torch.__version__}: torch.cuda.is_available() is False")' 2>&1 |
        tail -n 1 || true)
    python3 - "$OUT/torch-bf16.json" "$why" <<'PY'
import json, sys
json.dump({"available": False,
           "reason": f"no torch with CUDA in this python3 ({sys.argv[2]}); the device machine cannot install it "
                     "(no PyPI, at most 64 MiB per transfer)",
           "baseline": "the ORT fp32 perception model-only figure at batch 32 (bench-fp32-b32.json) is the baseline",
           "results": []}, open(sys.argv[1], "w"), indent=1)
PY
    echo "torch unavailable: wrote $OUT/torch-bf16.json"
fi

echo "==> summary"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
print("perception model-only throughput, batch 32 (bench perception graph, "
      "host<->device copies included on both sides)")
ort = {}
for name in ("fp32", "fp16", "fp16-ort"):
    r = load(f"bench-{name}-b32.json")
    if not r:
        continue
    m = r["runs"][0]["models"].get("perception", {})
    ort[name] = (m.get("model_only_items_per_s", 0.0), m.get("model_only_batch_size", 0))
    note = "" if ort[name][1] == 32 else f"  (NOTE: model-only batch was {ort[name][1]}, not 32)"
    print(f"  ORT CUDA {name:9s} {ort[name][0]:9.1f} img/s @ b{ort[name][1]}{note}")
bound, plain = load("bench-fp32.json"), load("bench-fp32-no-binding.json")
if bound and plain:
    def fig(r):
        run = r["runs"][0]
        return run["jobs_per_s"], run["models"].get("perception", {}).get("model_only_items_per_s", 0.0)
    (jb, pb), (jp, pp) = fig(bound), fig(plain)
    print(f"IO binding (fp32, dynamic): {jb:.1f} jobs/s, perception model-only {pb:.1f} items/s; "
          f"without: {jp:.1f} jobs/s, {pp:.1f} items/s")
t = load("torch-bf16.json") or {}
by_batch = {x["batch"]: x for x in t.get("results", []) if "img_per_s" in x}
for b in sorted(by_batch):
    print(f"  torch eager bf16   {by_batch[b]['img_per_s']:9.1f} img/s @ b{b}")
if 32 in by_batch:
    for name, (ips, b) in ort.items():
        print(f"ratio ORT {name} model-only @ b{b} / torch bf16 @ b32 = {ips / by_batch[32]['img_per_s']:.2f}")
else:
    print(f"torch bf16: unavailable ({t.get('reason', 'no torch-bf16.json')}); "
          "the baseline is the ORT fp32 model-only figure above")
PY
echo "==> done: $OUT"

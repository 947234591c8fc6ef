#!/usr/bin/env bash
# GPU benchmark: bench train for U-Net and TransUNet at 240x240, bfloat16, batch 1 and 16,
# achieved TFLOP/s and MFU against the card's dense bf16 peak, plus the PyTorch U-Net twin
# (skipped when torch with CUDA cannot be imported). Writes JSON lines to $OUT/gpu_bench.jsonl.
#
# Needs a CUDA build of jax plus the brats_jax dependencies (only the models and bench are
# used); optional: a CUDA build of torch for the twin.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh   (<= ~8 min)
# STAGES picks parts (default "unet transunet extra multirun torch"); "explore" runs
# benchmarks/gpu_explore.py (op variants + profiler trace of the U-Net step, <= ~5 min);
# TRANSUNET_BATCHES (default "1 16") sets the TransUNet batch sizes.
# On the lent H100/H200 (jax 0.11 with CUDA 13, flax, optax, orbax, torch preinstalled) only
# grain, clu, ml_collections, tensorboardX, nibabel, array_record and portpicker are missing:
# carry them as wheels in .whl/ (see .library device README) and this script installs them.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
JSONL="$OUT/gpu_bench.jsonl"
: > "$JSONL"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${GPU:-unknown}"
nvidia-smi 2>/dev/null | head -15 > "$OUT/nvidia_smi.txt"
# dense bf16 peak TFLOP/s (no sparsity): H100/H200 SXM 989, H100 PCIe 756, A100 312.
case "$GPU" in
  *H200*) PEAK=989 ;;
  *H100*PCIe*) PEAK=756 ;;
  *H100*) PEAK=989 ;;
  *A100*) PEAK=312 ;;
  *) PEAK=989 ;;
esac
add_mfu() {  # stdin: JSON lines from bench; adds gpu, peak and mfu
  $PY -c "
import json,sys
for line in sys.stdin:
    line=line.strip()
    if not line.startswith('{'): print(line, file=sys.stderr); continue
    r=json.loads(line); r['gpu']='''$GPU'''; r['peak_bf16_tflops']=$PEAK
    if r.get('tflops') is not None: r['mfu']=round(r['tflops']/$PEAK,4)
    if r.get('tflops_pipelined') is not None: r['mfu_pipelined']=round(r['tflops_pipelined']/$PEAK,4)
    print(json.dumps(r)); sys.stdout.flush()
"
}
STAGES=${STAGES:-unet transunet extra multirun torch}
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
bench_train() {  # $1: timeout seconds, rest: bench train flags
  local t=$1; shift
  timeout "$t" $PY -m brats_jax.bench train --image-size=240 --steps=10 --dtype=bfloat16 "$@" \
    2>>"$OUT/stderr.txt" | add_mfu | tee -a "$JSONL"
}
if has explore; then
  timeout 330 $PY -m benchmarks.gpu_explore --out="$OUT" --peak="$PEAK" --budget-s=190 \
    --profile 2>>"$OUT/stderr.txt"
fi
if has unet; then
  for bs in 1 16; do bench_train 70 --model=unet --batch-size=$bs; done
fi
if has transunet; then  # compiling the full TransUNet train step took 86 s on an H200
  for bs in ${TRANSUNET_BATCHES:-1 16}; do bench_train 180 --model=transunet --batch-size=$bs; done
fi
if has extra; then  # U-Net at a larger batch
  bench_train 70 --model=unet --batch-size=32
fi
if has multirun; then
  # Issue 9: the study's setting (U-Net, 240 px, batch 1) as K=8 stacked runs (vmap) vs one.
  timeout 120 $PY -m brats_jax.bench multirun --model=unet --image-size=240 --batch-size=1 \
    --runs=8 --steps=5 --mapping=vmap --dtype=bfloat16 2>>"$OUT/stderr.txt" | tee -a "$JSONL"
fi
# PyTorch twin of the U-Net (bf16 autocast, channels_last), same shapes; optional.
has torch && timeout 70 $PY - "$GPU" "$PEAK" <<'PYEOF' 2>>"$OUT/stderr.txt" | tee -a "$JSONL"
import json, statistics, sys, time
try:
    import torch
    assert torch.cuda.is_available()
except Exception as e:  # torch missing or CPU-only build
    print(json.dumps({"bench": "torch_train", "skipped": f"torch unavailable: {e!r}"})); sys.exit(0)
from benchmarks.torch_unet import TorchUNet
gpu, peak = sys.argv[1], float(sys.argv[2])
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
for bs in (1, 16):
    m = TorchUNet().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.randn(bs, 4, 240, 240, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (bs, 240, 240), device="cuda")
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward(); opt.step()
    for _ in range(5): step()
    torch.cuda.synchronize(); ts = []
    for _ in range(20):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    # FLOPs: 3x forward conv FLOPs (fwd + input grad + weight grad), counted analytically.
    flops = 0
    h = 240
    f = [64, 128, 256, 512, 1024]
    cin = 4
    for i, c in enumerate(f):
        s = (h >> i) ** 2
        flops += 2 * s * 9 * (cin * c + c * c); cin = c
    for i in (3, 2, 1, 0):
        s = (h >> i) ** 2; c = f[i]
        flops += 2 * (s // 4) * 4 * (2 * c) * c + 2 * s * 9 * (2 * c * c + c * c)
    flops += 2 * h * h * 64 * 4
    flops = 3 * flops * bs
    tf = flops / med / 1e12
    print(json.dumps({"bench": "torch_train", "model": "unet_torch", "image_size": 240,
                      "batch_size": bs, "dtype": "bfloat16-autocast", "step_s_median": round(med, 5),
                      "slices_per_s": round(bs / med, 2), "flops_per_step": flops,
                      "tflops": round(tf, 2), "gpu": gpu, "peak_bf16_tflops": peak,
                      "mfu": round(tf / peak, 4), "torch": torch.__version__}))
    sys.stdout.flush()
    del m, opt
PYEOF
echo "wrote $JSONL"

#!/usr/bin/env bash
# GPU benchmark of issue 20, one script, <= ~8 min on one H100/H200 (JSON lines to
# $OUT/gpu_bench.jsonl; every row has its stage's timeout):
#   unet       bench train U-Net 240 px bf16, batches 1, 16, 32 (default ops), MFU    ~70 s
#   transunet  bench train TransUNet (scanned) batches 1, 16: MFU and compile_s        ~90 s
#   grouped    K=16 batch-1 runs in one program (conv_impl=gemm, vmap) vs 16 single
#              steps, U-Net and TransUNet (benchmarks/grouped_runs.py)                 ~150 s
#   torch      PyTorch U-Net twin, eager and torch.compile (max-autotune, falls back
#              to the default mode), channels_last + bf16 autocast, batches 1, 16      ~150 s
# Every Python entry point here also runs on a CPU with tiny sizes (--smoke, see
# tests/test_benchmarks_smoke.py), so the script is checked without a GPU.
#
# Needs a CUDA build of jax plus the brats_jax dependencies (only the models and bench are
# used); optional: a CUDA build of torch for the twin.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh   (<= ~8 min)
# STAGES picks parts (default "unet transunet grouped torch"); "ablation" trains and predicts
# issue 19's cross-validated ablation (experiments/analyses/segmentation_ablation.py, data in
# NIFTI_ROOT; <= ~7 min, results in $OUT/ablation.tar.gz); "multirun" runs the old bench
# multirun K=8 vmap row, "unscanned" the per-block TransUNet compile time; "explore" runs
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
STAGES=${STAGES:-unet transunet grouped torch}
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
if has unet; then  # the bench rows of the default ops (gpu_fast) at batches 1, 16, 32
  for bs in 1 16 32; do bench_train 70 --model=unet --batch-size=$bs; done
fi
if has transunet; then  # scanned TransUNet (nn.scan): compile_s in each row; unscanned took 86 s
  # XLA's cost analysis counts a scan's body ~once: FLOPs (and MFU) from the per-block model.
  for bs in ${TRANSUNET_BATCHES:-1 16}; do
    timeout 120 $PY -m brats_jax.bench train --image-size=240 --steps=10 --dtype=bfloat16 \
      --model=transunet --batch-size=$bs 2>>"$OUT/stderr.txt" \
      | JAX_PLATFORMS=cpu timeout 60 $PY -m benchmarks.transunet_compile --fix-rows \
      2>>"$OUT/stderr.txt" | add_mfu | tee -a "$JSONL"
  done
fi
if has unscanned; then  # compile time of the per-block (scan=False) TransUNet, for comparison
  timeout 150 $PY -m benchmarks.transunet_compile --scan=false --dtype=bfloat16 \
    2>>"$OUT/stderr.txt" | tee -a "$JSONL"
  timeout 100 $PY -m benchmarks.transunet_compile --scan=true --dtype=bfloat16 \
    2>>"$OUT/stderr.txt" | tee -a "$JSONL"
fi
if has grouped; then  # K=16 batch-1 runs in one program vs 16 single steps (issue 20: >= 5x)
  timeout 90 $PY -m benchmarks.grouped_runs --model=unet --runs=16 --dtype=bfloat16 \
    --mappings=${GROUPED_MAPPINGS:-single,gemm} 2>>"$OUT/stderr.txt" | add_mfu | tee -a "$JSONL"
  timeout 150 $PY -m benchmarks.grouped_runs --model=transunet --runs=16 --dtype=bfloat16 \
    --mappings=${GROUPED_MAPPINGS:-single,gemm} 2>>"$OUT/stderr.txt" | add_mfu | tee -a "$JSONL"
fi
if has multirun; then  # issue 9's row: U-Net K=8 stacked runs (vmap, grouped convolutions)
  timeout 120 $PY -m brats_jax.bench multirun --model=unet --image-size=240 --batch-size=1 \
    --runs=8 --steps=5 --mapping=vmap --dtype=bfloat16 2>>"$OUT/stderr.txt" | tee -a "$JSONL"
fi
if has torch; then  # PyTorch twin at its strongest; rows say "skipped" without torch + CUDA
  TB=($PY -m benchmarks.torch_bench --peak="$PEAK" --gpu="$GPU")
  timeout 60 "${TB[@]}" --variants=eager 2>>"$OUT/stderr.txt" | tee -a "$JSONL"
  timeout 150 "${TB[@]}" --variants=compile --compile-mode=max-autotune 2>>"$OUT/stderr.txt" \
    | tee -a "$JSONL" \
    || timeout 90 "${TB[@]}" --variants=compile --compile-mode=default 2>>"$OUT/stderr.txt" \
    | tee -a "$JSONL"
fi
if has ablation; then  # issue 19: the cross-validated ablation's GPU part (train + predict)
  # NIFTI_ROOT: the 18-case real sample, unpacked; scoring runs afterwards on any machine:
  # python -m experiments.analyses.segmentation_ablation score --data_root=... --out=<unpacked>
  ABL=/tmp/ablation
  timeout "${ABLATION_TIMEOUT_S:-420}" $PY -m experiments.analyses.segmentation_ablation \
    train,predict --data_root="$NIFTI_ROOT" --out=$ABL --parallel="${ABLATION_PARALLEL:-12}" \
    2>&1 | tee "$OUT/ablation_log.txt" | grep -E "^(started|finished|train|predict|error|.*wrote)"
  (cd $ABL && tar czf "$OUT/ablation.tar.gz" folds.json predictions runs/*.log \
    runs/*/results.json runs/*/metrics.jsonl runs/*/config.json runs/*/per_case.csv)
fi
echo "wrote $JSONL"

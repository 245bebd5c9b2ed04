#!/usr/bin/env bash
# Several-GPU checks and scaling on a GPU machine (from the repository root, binary in .gpu/):
# NCCL runs of the tiny models against the 1-GPU run, an injected rank failure, and the step
# scaling of FLUX.1-dev 1024² and Wan2.2 A14B 480p with random full-size weights.
# Usage: scripts/gpu-multi.sh OUT_DIR [checks|flux|attn-fp8|wan|all|host|timing|shared] [GPU counts, default 1,2]
# `shared` runs the sharded code paths with all ranks on GPU 0 (machines with one GPU).
# (parts fit the 10-minute command limit of the borrowed machines one by one)
set -uo pipefail
OUT=${1:?output folder}; PART=${2:-all}; GPUS=${3:-1,2}
R=.gpu/run.sh
mkdir -p "$OUT"
nvidia-smi -L
ls /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib 2>/dev/null
N=$(nvidia-smi -L | wc -l)
if [ "$PART" = checks ] || [ "$PART" = all ]; then
# Tiny models end to end: the sharded runs against one GPU (bf16 on GPU: compared, not equal).
for extra in "" "--negative-prompt blurry --true-cfg 3"; do
  tag=$([ -z "$extra" ] && echo plain || echo cfg)
  $R t2i --model tiny --prompt "a red cat on a boat" --seed 7 $extra --output "$OUT/t2i-$tag-1.png" 2>&1 | tail -1
  $R t2i --model tiny --prompt "a red cat on a boat" --seed 7 $extra --gpus "$N" --output "$OUT/t2i-$tag-$N.png" 2>&1 | tail -2
done
$R t2i --model flux.2-klein-tiny --prompt "a red cat" --seed 5 --output "$OUT/klein-1.png" 2>&1 | tail -1
$R t2i --model flux.2-klein-tiny --prompt "a red cat" --seed 5 --gpus "$N" --output "$OUT/klein-$N.png" 2>&1 | tail -2
$R t2v --model wan-tiny --prompt "a red fox running" --seed 3 --output "$OUT/wan-1.png" 2>&1 | tail -1
$R t2v --model wan-tiny --prompt "a red fox running" --seed 3 --gpus "$N" --output "$OUT/wan-$N.png" 2>&1 | tail -2
# A rank that fails: the run must stop with its error, not hang.
start=$(date +%s)
CANDIFF_TEST_FAIL_RANK=1 timeout 90 $R t2v --model wan-tiny --prompt "a fox" --gpus "$N" --output "$OUT/fail.gif" > "$OUT/fault.log" 2>&1
echo "injected failure: exit $? after $(( $(date +%s) - start ))s, output written: $([ -e "$OUT/fail.gif" ] && echo yes || echo no)"
tail -2 "$OUT/fault.log"
fi
# Scaling with random full-size weights.
if [ "$PART" = flux ] || [ "$PART" = all ]; then
NCCL_DEBUG=INFO timeout 200 $R bench flux-step --gpus "$GPUS" --variants ${FLUX_VARIANTS:-bf16,nvfp4:trtllm:fp8} --iters 5 \
  --out "$OUT/flux1_scaling.json" > "$OUT/flux1_scaling.log" 2>&1
grep -E " via |ms/step|GB/s|floor|rror" "$OUT/flux1_scaling.log" | awk '!seen[$0]++' | head -40
fi
if [ "$PART" = attn-fp8 ] || [ "$PART" = all ]; then
# FP8 attention (`--attention fp8`) under sequence and CFG parallelism, against its own 1-GPU run.
CANDIFF_ATTENTION=fp8 timeout 200 $R bench flux-step --gpus "$GPUS" --variants nvfp4:trtllm:fp8 --iters 5 \
  --out "$OUT/flux1_scaling_attn_fp8.json" 2>&1 | grep -E "ms/step|rror"
CANDIFF_ATTENTION=fp8 timeout 200 $R bench wan-step --model ti2v-5b --gpus "$GPUS" --variants nvfp4:trtllm:fp8 --iters 1 \
  --out "$OUT/wan_ti2v_scaling_attn_fp8.json" 2>&1 | grep -E "ms/step|rror"
fi
if [ "$PART" = wan ] || [ "$PART" = all ]; then
timeout 200 $R bench wan-step --model a14b --width 832 --height 480 --frames 81 --gpus "$GPUS" \
  --variants ${WAN_VARIANTS:-bf16} --iters 1 --out "$OUT/wan_a14b_scaling.json" 2>&1 | grep -v "^\s*$"
fi
if [ "$PART" = timing ]; then
  # Where a sharded FLUX step's time goes: GPU time per kind of work (CUDA events, no synchronization).
  CANDIFF_PROFILE=1 timeout 200 $R bench flux-step --gpus "$GPUS" --variants bf16 --iters 3 2>&1 | grep -E "ms/step|rank"
fi
if [ "$PART" = host ]; then
  # 256²: GPU work is small, so the step time is the host's (ops enqueued per step).
  timeout 120 $R bench flux-step --gpus "$GPUS" --variants bf16,nvfp4:trtllm:fp8 --iters 5 --width 256 --height 256 \
    --out "$OUT/flux1_256_scaling.json" 2>&1 | grep -E "ms/step|host"
fi
if [ "$PART" = shared-bench ]; then
  export RUST_LOG=candiff=info
  timeout 60 $R bench flux-step --gpus 1,2 --shared --variants bf16 --iters 1 --width 256 --height 256 2>&1 | grep -v "^\s*$"
  timeout 150 $R bench flux-step --gpus 1,2,4 --shared --variants bf16 --iters 2 --out "$OUT/flux1_shared.json" 2>&1 | grep -v "^\s*$"
  timeout 170 $R bench wan-step --model a14b --width 832 --height 480 --frames 81 --gpus 1,2 --shared --variants bf16 --iters 1 --out "$OUT/wan_a14b_shared.json" 2>&1 | grep -v "^\s*$"
fi
if [ "$PART" = shared ]; then
  for m in "t2i --model tiny --prompt a_red_cat --seed 7" "t2i --model flux.2-klein-tiny --prompt a_red_cat --seed 5" \
           "t2v --model wan-tiny --prompt a_red_fox --seed 3"; do
    tag=$(echo "$m" | awk '{print $1"-"$3}')
    for n in 1 2 4; do
      ext=png; $R $m --ranks $n --output "$OUT/shared-$tag-$n.$ext" 2>&1 | tail -1
    done
  done
  timeout 300 $R bench flux-step --gpus 1,2,4 --shared --variants bf16,nvfp4:trtllm:fp8 --iters 1 --out "$OUT/flux1_shared.json" 2>&1 | grep -v "^\s*$"
  timeout 240 $R bench wan-step --model a14b --width 832 --height 480 --frames 81 --gpus 1,2 --shared --variants bf16 --iters 1 --out "$OUT/wan_a14b_shared.json" 2>&1 | grep -v "^\s*$"
fi

# session 10 as run. Call 1 started this detached (phase A never finished; see README.md); call 4 ran
# .gpu/s10b.sh, which had not been carried (nothing ran); call 5, with 156 s of device time left, ran decode.py.
# session 10, detached on the H200 (call 1 carries .whl .gpu data .teacher/p00; call 2 .teacher/p01 -> ~/t/smol.gguf).
# Phase A, in parallel (timings not used): the GPU error test, one process per case (each compiles its
#   own fla kernels: dtype, N and variant; FLA_CACHE_RESULTS=0 keeps no autotune choice made on a shared
#   GPU), a warm-up bench run (fla's fused_recurrent, the CUDA-graph decode), and the step-2 curves.
# Phase B, alone on the GPU: kernels.py --bench at smol-L512 with the decode rows, then the A/B of the
#   TF32 candidates against main at every shape, fla's two calls in the same process.
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1 TQDM_MININTERVAL=30
cd ~/repo; R=~/res; mkdir -p $R
note() { echo "$(date +%T) $*" >> ~/status; }
nvidia-smi > $R/nvidia-smi.txt 2>&1; python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)" > $R/versions.txt 2>&1
note "start"
pids=()
for id in dtype0-64-rwkv7 dtype0-64-rwkv6 dtype1-64-rwkv7 dtype1-64-rwkv6 dtype2-128-rwkv7 dtype2-128-rwkv6 \
          dtype3-128-rwkv7 dtype3-128-rwkv6 dtype4-128-rwkv7 dtype4-128-rwkv6; do
  ( FLA_CACHE_RESULTS=0 python3 -m pytest -s -q -p no:cacheprovider "test_kernels_triton.py::test_gpu_vs_oracle[$id]" \
      > $R/pytest_$id.txt 2>&1; note "pytest $id rc=$?" ) & pids+=($!)
done
( python3 -m pytest -s -q -p no:cacheprovider -k "auto_picks or strong_decay" test_kernels_triton.py > $R/pytest_other.txt 2>&1; note "pytest other rc=$?" ) & pids+=($!)
( FLA_CACHE_RESULTS=0 python3 kernels.py --bench --shapes smol-L512 > $R/warm_bench.txt 2>&1; note "warm bench rc=$?" ) & pids+=($!)
( while [ ! -f ~/t/smol.gguf ]; do sleep 5; done; bash .gpu/c10.sh; note "curves done" ) & pids+=($!)
wait "${pids[@]}"; note "phase A done"
cat $R/pytest_dtype*.txt > $R/pytest_gpu.txt
python3 kernels.py --bench --shapes smol-L512 > $R/kernels_bench.txt 2>&1; note "bench rc=$?"
FLA=1 SHAPES=smol-L512,smol-L4k,q7b-L512,q7b-L4k,q7b-L16k python3 .gpu/ab.py .gpu/k_main.py .gpu/k_tf32_nearest.py \
  .gpu/k_tf32_nearest_dot3.py > $R/ab.txt 2>&1; note "ab rc=$?"
touch ~/all.done; note "all done"

# ---- .gpu/c10.sh (the curves, phase A)
# session 10: 100 step-2 updates from one fresh step-1 student: --backend triton and torch (micro-batch 16),
# torch at micro-batch 8 (the same math summed in another order: the noise reference), and triton with
# the tf32_nearest_dot3 candidate kernels (a copy of the repo).
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
cd ~/repo; T=~/t/smol.gguf; RUNS=~/runs; mkdir -p $RUNS
note() { echo "$(date +%T) $*" >> ~/status; }
python3 distill.py --step 1 --out $RUNS/base --data data/default --tokens 1.05e6 --teacher $T --ctx 512 \
  --batch 32 --micro-batch 16 > $RUNS/base1.log 2>&1; note "base step1 rc=$?"
C=(--step 2 --init $RUNS/base/step1/student --teacher $T --data data/default --ctx 512 --batch 16
   --tokens 819200 --lr 1e-4 --eval-every 50 --deterministic)
python3 distill.py "${C[@]}" --micro-batch 16 --backend triton --out $RUNS/curve/triton > $RUNS/c_triton.log 2>&1; note "triton rc=$?"
python3 distill.py "${C[@]}" --micro-batch 16 --backend torch --out $RUNS/curve/torch > $RUNS/c_torch.log 2>&1; note "torch rc=$?"
python3 distill.py "${C[@]}" --micro-batch 8 --backend torch --out $RUNS/curve/torch_mb8 > $RUNS/c_torch_mb8.log 2>&1; note "torch mb8 rc=$?"
rm -rf ~/repo_c && cp -r ~/repo ~/repo_c && cp .gpu/k_tf32_nearest_dot3.py ~/repo_c/kernels.py
(cd ~/repo_c && python3 distill.py "${C[@]}" --micro-batch 16 --backend triton --out $RUNS/curve/triton_dot3 > $RUNS/c_triton_dot3.log 2>&1); note "triton dot3 rc=$?"
python3 .gpu/compare.py $RUNS/curve torch triton torch_mb8 triton_dot3 > $RUNS/curves.txt 2>&1

# ---- .gpu/decode.py (call 5)
import sys, os, triton
sys.path.insert(0, os.getcwd())
import kernels
b = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
kernels.bench_decode(None, b)
kernels.bench_decode(kernels._fla(), b)

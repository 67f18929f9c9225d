# session 9, detached on the H200 (the script as run; the repo copied to ~/repo, fla's wheels in ~/site).
# Phase A, in parallel, its timings not used: fla's kernels compiled by one process per head size and
# variant (FLA_CACHE_RESULTS=0: no autotune choice made on a shared GPU is kept; warm/), and the GPU
# error tests. Phase B, alone on the GPU: the full bench. (A decode launch sweep after it failed to
# import kernels: it ran from .gpu/ without the repo root on sys.path.)
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1
cd ~/repo; R=~/res; mkdir -p $R
note() { echo "$(date +%T) $*" >> ~/status; }
nvidia-smi > $R/nvidia-smi.txt 2>&1; python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)" > $R/versions.txt 2>&1
note "warm start"
for s in smol-L512 q7b-L4k; do for v in rwkv7 rwkv6; do
  FLA_CACHE_RESULTS=0 python3 kernels.py --bench --shapes $s --variants $v > $R/warm_${s}_$v.txt 2>&1 &
done; done
( FLA_CACHE_RESULTS=0 python3 -m pytest -s -q -p no:cacheprovider -k gpu test_kernels_triton.py > $R/pytest_gpu.txt 2>&1; note "pytest rc=$?" ) &
wait; note "phase A done"
python3 kernels.py --bench > $R/kernels_bench.txt 2>&1; note "bench rc=$?"
python3 .gpu/decode_sweep.py > $R/decode_sweep.txt 2>&1; note "sweep rc=$?"
touch ~/bench.done; note "all done"

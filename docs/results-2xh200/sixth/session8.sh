# session 8, detached on the H200: A/B of the candidates -> winner -> (curve || fla warm-up + GPU errors) -> bench.
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1 TQDM_MININTERVAL=30
cd ~/repo; R=~/res; mkdir -p $R
note() { echo "$(date +%T) $*" >> ~/status; }
nvidia-smi > $R/nvidia-smi.txt 2>&1; python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)" > $R/versions.txt 2>&1
SHAPES=q7b-L4k,q7b-L512,q7b-L16k,smol-L512 python3 .gpu/ab.py .gpu/k_main.py .gpu/k_states.py .gpu/k_vpairs.py \
  .gpu/k_states_vpairs.py .gpu/k_states_vpairs.py:_BK=16 > $R/ab.txt 2>&1; note "ab rc=$?"
python3 .gpu/pick.py $R/ab.txt kernels.py > $R/pick.txt 2>&1; note "pick rc=$? $(tail -1 $R/pick.txt)"
( python3 kernels.py --bench --shapes q7b-L4k,q7b-L512,smol-L512 > $R/warm.txt 2>&1; note "warm rc=$?"; touch ~/warm.done
  python3 -m pytest -s -q -p no:cacheprovider -k gpu test_kernels_triton.py > $R/pytest_gpu.txt 2>&1; note "pytest rc=$?" ) &
while [ ! -f ~/t/smol.gguf ]; do sleep 5; done
bash .gpu/curve.sh; note "curve done"
wait; python3 kernels.py --bench --shapes q7b-L4k,q7b-L512,smol-L512 > $R/kernels_bench.txt 2>&1; note "bench rc=$?"
touch ~/all.done; note "all done"

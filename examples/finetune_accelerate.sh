#!/usr/bin/env bash
# Fine-tune a *_dec model with accelerate (timm_dec.finetune), on one or several processes.
#
#   bash examples/finetune_accelerate.sh                          # tiny preset, offline digits, CPU, a few minutes
#   NUM_PROCESSES=2 bash examples/finetune_accelerate.sh          # the same run on 2 processes (GPUs, or CPU + gloo)
#   PRESET=digits NUM_PROCESSES=8 bash examples/finetune_accelerate.sh   # 224 px, pretrained ViT-S, 3-digit numbers
#   bash examples/finetune_accelerate.sh --push-to-hub ORG/NAME   # extra arguments go to timm_dec.finetune
#
# Without GPUs the processes run on CPU over gloo: accelerate's multi-process launcher plus timm_dec.finetune --cpu
# (accelerate's own --cpu launch flag starts a single process unless run under mpirun).
# The global batch is BATCH_SIZE x NUM_PROCESSES x GRAD_ACCUM; the same global batch gives the same run whatever the
# process count. OUTPUT gets checkpoint-<step>/ folders (resume with --resume OUTPUT/checkpoint-<step> or
# --resume latest), final/ (a Hub folder with the model card) and summary.json (accuracy, InvE, per-scale accuracy).
# Then: python examples/publish.py --model local-dir:OUTPUT/final --push ORG/NAME
set -euo pipefail

PYTHON=${PYTHON:-python}
PRESET=${PRESET:-tiny}
NUM_PROCESSES=${NUM_PROCESSES:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}
OUTPUT=${OUTPUT:-runs/finetune-${PRESET}}

case "$PRESET" in
  tiny)     # a small ViT from scratch on 1-digit numbers at 32 px: shows the whole pipeline on a laptop CPU
    BATCH_SIZE=${BATCH_SIZE:-32}
    ARGS=(--model vit_tiny_dec --img-size 32 --num-digits 1 --digit-size 16 --train-samples "${TRAIN_SAMPLES:-2000}"
          --test-samples "${TEST_SAMPLES:-200}"
          --model-kwargs patch_size=8 embed_dim=64 depth=4 num_heads=4 global_pool=avg dec_blocks=input
          dec_image_widths=8,16
          --epochs "${EPOCHS:-5}" --warmup-epochs 1 --lr 2e-3 --checkpoint-every 20) ;;
  digits)   # paper Sec. 5.2 setting: pretrained ViT-S/16 on locally scaled 3-digit numbers, 224 px (GPUs)
    BATCH_SIZE=${BATCH_SIZE:-32}
    ARGS=(--model vit_small_dec --pretrained --img-size 224 --num-digits 3 --epochs "${EPOCHS:-50}" --lr 1e-4
          --mixed-precision bf16) ;;
  *) echo "unknown PRESET=$PRESET (tiny | digits)" >&2; exit 2 ;;
esac

LAUNCH=(--num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision no --dynamo_backend no)
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ARGS+=(--cpu)
fi
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH+=(--multi_gpu)
fi

exec "$PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" -m timm_dec.finetune "${ARGS[@]}" \
  --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM" --output "$OUTPUT" "$@"

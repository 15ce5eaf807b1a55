#!/usr/bin/env bash
# The embedded default, end to end on CPU in a few minutes, offline:
#   1. set up .venv;
#   2. build a tiny SDXL (diffusers format) whose UNet and VAE were pretrained on fill images
#      (assets/tiny-fill-base: it draws coloured discs, but cannot know where), and a fill50k-style
#      dataset of circles;
#   3. train an adapter with `accelerate launch`, validating on held-out circles: every 100 steps
#      (and before the first) the conditioning gain on 32 pairs held out of training, logged to
#      tensorboard and plotted to demo/control_curve.png;
#   4. score the adapter on held-out circles (scripts/evaluate.py: conditioning gain, and IoU of
#      the generated disc with the condition's circle, against a shuffled condition and the base alone);
#   5. generate with the trained adapter through StableDiffusionXLAdapterPipeline.
# Everything lands in demo/. Set DEMO_STEPS to train longer or shorter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The tiny models gain nothing from intra-op threads, and on a busy machine extra threads slow them down.
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
OUT=demo
STEPS="${DEMO_STEPS:-1200}"

mkdir -p "$OUT"
# Rebuilt every time (a few seconds), so that an older random tiny-sdxl left in demo/ is never reused.
$PY scripts/make_tiny_sdxl.py --output_dir "$OUT/tiny-sdxl" --pretrained_base assets/tiny-fill-base > "$OUT/tiny-sdxl.log"
$PY scripts/make_fill_dataset.py --output_dir "$OUT/fill-data" --num_samples 1024 --resolution 64 --num_validation 4 \
    > "$OUT/fill-data.log"
mapfile -t VALIDATION_IMAGES < <($PY -c "import json; [print(v['image']) for v in json.load(open('$OUT/fill-data/validation/validation.json'))]")
mapfile -t VALIDATION_PROMPTS < <($PY -c "import json; [print(v['prompt']) for v in json.load(open('$OUT/fill-data/validation/validation.json'))]")
VALIDATION_IMAGES=("${VALIDATION_IMAGES[@]/#/$OUT/fill-data/validation/}")

$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_t2i_adapter_sdxl.py \
    --pretrained_model_name_or_path "$OUT/tiny-sdxl" \
    --train_data_dir "$OUT/fill-data/imagefolder" \
    --output_dir "$OUT/adapter" \
    --resolution 64 \
    --train_batch_size 8 \
    --learning_rate 1e-3 \
    --max_train_steps "$STEPS" \
    --checkpointing_steps "$STEPS" \
    --validation_steps 100 \
    --validation_pairs 32 \
    --validation_prompt "${VALIDATION_PROMPTS[@]}" \
    --validation_image "${VALIDATION_IMAGES[@]}" \
    --num_validation_images 2 \
    --dataloader_num_workers 1 \
    --seed 0

echo
$PY scripts/plot_control_curve.py --logdir "$OUT/adapter/logs" --output "$OUT/control_curve.png"
echo
$PY scripts/evaluate.py --pretrained_model_name_or_path "$OUT/tiny-sdxl" --adapter "$OUT/adapter" \
    --num_samples 128 --noise_draws 1 --seeds 0 1 --num_images 32 \
    --output_json "$OUT/evaluation.json" --grid "$OUT/evaluation.png"
echo
$PY scripts/generate.py --pretrained_model_name_or_path "$OUT/tiny-sdxl" --adapter "$OUT/adapter" \
    --prompt "${VALIDATION_PROMPTS[@]}" --image "${VALIDATION_IMAGES[@]}" \
    --num_inference_steps 20 --output_dir "$OUT/samples"
echo
echo "Demo done: adapter in $OUT/adapter (model card README.md, images_*.png), scores in $OUT/evaluation.json"
echo "(grid: $OUT/evaluation.png), the control curve in $OUT/control_curve.png, samples in $OUT/samples/grid.png,"
echo "tensorboard logs in $OUT/adapter/logs (tensorboard --logdir $OUT/adapter/logs)."

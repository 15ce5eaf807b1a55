#!/usr/bin/env bash
# The embedded default, end to end on CPU in a few minutes, offline:
#   1. set up .venv;
#   2. build a tiny SDXL (diffusers format) and a fill50k-style dataset of circles;
#   3. train an adapter with `accelerate launch`, validating on held-out circles;
#   4. generate with the trained adapter through StableDiffusionXLAdapterPipeline.
# Everything lands in demo/. Set DEMO_STEPS to train longer or shorter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
OUT=demo
STEPS="${DEMO_STEPS:-300}"

[ -f "$OUT/tiny-sdxl/model_index.json" ] || $PY scripts/make_tiny_sdxl.py --output_dir "$OUT/tiny-sdxl"
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
    --checkpointing_steps 100 \
    --validation_steps 100 \
    --validation_prompt "${VALIDATION_PROMPTS[@]}" \
    --validation_image "${VALIDATION_IMAGES[@]}" \
    --num_validation_images 2 \
    --dataloader_num_workers 1 \
    --seed 0

$PY scripts/generate.py --pretrained_model_name_or_path "$OUT/tiny-sdxl" --adapter "$OUT/adapter" \
    --prompt "${VALIDATION_PROMPTS[@]}" --image "${VALIDATION_IMAGES[@]}" \
    --num_inference_steps 20 --output_dir "$OUT/samples"
echo
echo "Demo done: adapter in $OUT/adapter (model card README.md, images_*.png), samples in $OUT/samples/grid.png,"
echo "tensorboard logs in $OUT/adapter/logs (tensorboard --logdir $OUT/adapter/logs)."

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
# Everything lands in demo/ (DEMO_DIR to change it). Set DEMO_STEPS to train longer or shorter.
# Run again, the demo continues its adapter to DEMO_STEPS (or, when it has them, only scores and
# samples it again); delete demo/adapter to start afresh.
#
# Usage: bash scripts/demo.sh            (DEMO_STEPS=1200 DEMO_DIR=demo by default)
#        DEMO_STEPS=2000 bash scripts/demo.sh
set -euo pipefail
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'  # the comment above
    exit 0
elif [ $# -gt 0 ]; then
    echo "demo.sh takes no arguments (see --help); set DEMO_STEPS or DEMO_DIR instead." >&2
    exit 2
fi
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The tiny models gain nothing from intra-op threads, and on a busy machine extra threads slow them down.
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[ "${VERSIONS:-newest}" = min ] && PY=.venv-min/bin/python  # as scripts/test.sh chooses
OUT="${DEMO_DIR:-demo}"
STEPS="${DEMO_STEPS:-1200}"

mkdir -p "$OUT"
# Rebuilt every time (a few seconds), so that an older random tiny-sdxl left in demo/ is never reused.
$PY scripts/make_tiny_sdxl.py --output_dir "$OUT/tiny-sdxl" --pretrained_base assets/tiny-fill-base > "$OUT/tiny-sdxl.log"
# The dataset is kept when an earlier demo built it alike (its manifest, written last, says how): rebuilt,
# its files would be new to datasets' fingerprint, and a continued demo would warn of a changed dataset.
DATA_SAMPLES=1024 DATA_RESOLUTION=64 DATA_VALIDATION=4
if ! $PY -c "import json, sys; m = json.load(open(sys.argv[1]))
sys.exit([m['num_samples'], m['resolution'], m['num_validation']] != [int(v) for v in sys.argv[2:]])" \
    "$OUT/fill-data/fill_dataset.json" $DATA_SAMPLES $DATA_RESOLUTION $DATA_VALIDATION 2> /dev/null; then
    $PY scripts/make_fill_dataset.py --output_dir "$OUT/fill-data" --num_samples $DATA_SAMPLES \
        --resolution $DATA_RESOLUTION --num_validation $DATA_VALIDATION > "$OUT/fill-data.log"
fi
mapfile -t VALIDATION_IMAGES < <($PY -c "import json; [print(v['image']) for v in json.load(open('$OUT/fill-data/validation/validation.json'))]")
mapfile -t VALIDATION_PROMPTS < <($PY -c "import json; [print(v['prompt']) for v in json.load(open('$OUT/fill-data/validation/validation.json'))]")
VALIDATION_IMAGES=("${VALIDATION_IMAGES[@]/#/$OUT/fill-data/validation/}")

# The same command continues an earlier demo's adapter (the trainer says from which step, or that it
# already has its steps) and starts one when there is none.
if [ -d "$OUT/adapter" ]; then
    echo "$OUT/adapter holds an earlier demo: continuing it to $STEPS steps (delete $OUT/adapter to start afresh)."
else
    echo "Training a new adapter in $OUT/adapter for $STEPS steps."
fi
$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_t2i_adapter_sdxl.py \
    --pretrained_model_name_or_path "$OUT/tiny-sdxl" \
    --train_data_dir "$OUT/fill-data/imagefolder" \
    --output_dir "$OUT/adapter" \
    --resolution $DATA_RESOLUTION \
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
    --seed 0 \
    --resume_from_checkpoint latest

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

#!/usr/bin/env bash
# Retrain the bundled demo model (engine/assets/demo) from nothing, on CPU or GPU.
# Run from the repository root; every step is deterministic given its seed.
# On the 2-core CPU it was trained on: data 10 s, stage 1 15 min (2000 steps), stage 2 48 min (3000 steps).
set -euo pipefail

# 1. Data: 30,000 training and 1,000 validation images of the shapes grammar (64 x 64).
vqim train shapes data/shapes/train -n 30000 --split train --seed 0
vqim train shapes data/shapes/validation -n 1000 --split validation --seed 0

# 2. Text tokenizer: BPE on the training captions (128 pieces keeps every word whole).
vqim train tokenizer data/shapes/train -o runs/shapes/tokenizer.model --vocab-size 128 --model-type bpe

# 3. Stage 1, the ViT-VQGAN tokenizer (16 x 16 codes of 2048 x 32-d).
vqim train stage1 train/configs/shapes_stage1.json

# 4. Stage 2, text encoder + image-token decoder on the frozen tokenizer (Adafactor8bit).
vqim train stage2 train/configs/shapes_stage2.json

# 5. Export into the package with the sampling settings picked on validation prompts
#    (cfg_scale 1.5, temperature 0.5 scored best of {1, 1.5, 2, 3} x {1.0, 0.5}), then score it
#    on the held-out prompts and redraw README's grid.
vqim train export runs/shapes/stage2/checkpoint.pt -o engine/assets/demo --dtype float32 --cfg-scale 1.5 --temperature 0.5
vqim eval shapes --model engine/assets/demo --device cpu -n 100 --cfg 1 1.5 --grid docs/demo_grid.png

# 6. The reranker beside the exported model (600 steps, batch 128: 8 min on the 2 cores), on a
#    second, larger draw of the training split, exported over the model (its other weights unchanged).
vqim train shapes data/shapes/train100k -n 100000 --split train --seed 1
vqim train scorer train/configs/shapes_scorer.json
vqim train export runs/shapes/scorer/checkpoint.pt -o engine/assets/demo --dtype float32 --cfg-scale 1.5 --temperature 0.5
vqim eval shapes --model engine/assets/demo --device cpu -n 100 --cfg 1.5 --candidates 1 4 8

# 7. The super-resolution module (64 -> 256 px) beside the exported model, on pairs rendered on
#    the fly (training split; the tokenizer's reconstruction -> the 256 px render): 900 steps of
#    16, L2 only, one thread (about 20 min on the 2 shared cores), written over the model (its
#    other weights unchanged); then PSNR/SSIM against bicubic on held-out scenes and docs/upscaled.png.
OMP_NUM_THREADS=1 vqim train superres train/configs/shapes_superres.json --export engine/assets/demo
python benchmarks/bench_superres.py -n 100 --save --image docs/upscaled.png

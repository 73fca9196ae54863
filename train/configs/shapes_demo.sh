#!/usr/bin/env bash
# Retrain the bundled demo model (engine/assets/demo) from nothing, on CPU or GPU.
# Run from the repository root; every step is deterministic given its seed.
# On the 2-core CPU it was trained on: data 10 s, stage 1 about 11 min, stage 2 about 40 min.
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

# 5. Export into the package and score it.
vqim train export runs/shapes/stage2/checkpoint.pt -o engine/assets/demo --dtype float32
vqim eval shapes --model engine/assets/demo --device cpu

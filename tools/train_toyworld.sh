#!/usr/bin/env bash
# Retrain every model of the toy world from scratch, with the fixed seeds and settings of the
# shipped weights in assets/toyworld/ (about an hour on 2 CPU cores), then measure them.
#
#   bash tools/train_toyworld.sh [OUT]        # default OUT: assets/toyworld (overwrites the weights)
#
# 1. CLIP (text tower = the LDM's text encoder; whole model = evaluate.py's CLIP)   toyworld/clip.py
# 2. AutoencoderKL, then the UNet as a latent diffusion model                        toyworld/ldm.py
# 3. ground-truth classifier (+ its TorchScript features for KID/FID)               toyworld/judge.py
# 4. copy-detection descriptor, TorchScript, for the SSCD code path                 toyworld/judge.py
# 5. quality bars (CLIP zero-shot, judged samples, memorization)                     toyworld/quality.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-assets/toyworld}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
"$PY" -m toyworld.clip --out "$OUT/clip" --steps 3000 --batch_size 128 --lr 1e-3 --pool 24000 --seed 0 --eval_n 1000
"$PY" -m toyworld.ldm --clip "$OUT/clip" --out "$OUT/ldm" --pool 30000 --vae_steps 1200 --unet_steps 5000 --seed 0
"$PY" -m toyworld.judge --out "$OUT" --what both --seed 0
"$PY" -m toyworld.quality --assets "$OUT" --out "$OUT/quality"

#!/usr/bin/env bash
# Retrain every model of the toy world from scratch, with the fixed seeds and settings of the
# shipped weights in assets/toyworld/, then measure them.
#
#   bash tools/train_toyworld.sh [OUT]        # default OUT: assets/toyworld (overwrites the weights)
#
# 1. CLIP (text tower = the LDM's text encoder; whole model = evaluate.py's CLIP)   toyworld/clip.py
#    in parallel with
#    AutoencoderKL (stage 1 of toyworld/ldm.py), then the ground-truth classifier
#    (+ its TorchScript features for KID/FID) and the copy-detection descriptor       toyworld/judge.py
# 2. the UNet as a latent diffusion model (reuses stage 1)                            toyworld/ldm.py
# 3. quality bars (CLIP zero-shot, judged samples, memorization)                     toyworld/quality.py
#
# Step 1 runs its two branches side by side with one thread each: these small models use a second
# thread poorly, so two one-thread jobs finish much sooner than the same jobs one after the other.
# Their output goes to log files (named below); the UNet and the quality report print to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-assets/toyworld}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/train_toyworld.XXXXXX")
VAE_ARGS=(--out "$OUT/ldm" --pool 30000 --vae_steps 1200 --seed 0)

echo "step 1: CLIP | VAE -> classifier + copy descriptor (logs: $LOGS)"
"$PY" -m toyworld.clip --out "$OUT/clip" --steps 3000 --batch_size 128 --lr 1e-3 --pool 24000 --seed 0 \
    --eval_n 1000 --threads 1 >"$LOGS/clip.log" 2>&1 &
clip=$!
{ "$PY" -m toyworld.ldm --stage vae "${VAE_ARGS[@]}" --threads 1 &&
  "$PY" -m toyworld.judge --out "$OUT" --what both --seed 0 --threads 1 --no_progress; } >"$LOGS/vae_judge.log" 2>&1 &
other=$!
status=0
wait "$clip" || { status=$?; echo "CLIP failed (exit $status), see $LOGS/clip.log" >&2; }
wait "$other" || { status=$?; echo "VAE or judges failed (exit $status), see $LOGS/vae_judge.log" >&2; }
[ "$status" -eq 0 ] || exit "$status"

echo "step 2: UNet"
"$PY" -m toyworld.ldm --clip "$OUT/clip" "${VAE_ARGS[@]}" --unet_steps 8000 --unet_lr 1e-3 --offset_noise 0.3 \
    --min_snr_gamma 5
echo "step 3: quality"
"$PY" -m toyworld.quality --assets "$OUT" --out "$OUT/quality"

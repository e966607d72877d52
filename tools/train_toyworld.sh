#!/usr/bin/env bash
# Retrain every model of the toy world from scratch, with the fixed seeds and settings of the
# shipped weights in assets/toyworld/, then measure them.
#
#   bash tools/train_toyworld.sh [OUT]        # default OUT: assets/toyworld (overwrites the weights)
#
# 1. CLIP (text tower = the LDM's text encoder; whole model = evaluate.py's CLIP),   toyworld/clip.py
#    then the ground-truth classifier (+ its TorchScript features for KID/FID)        toyworld/judge.py
#    in parallel with
#    AutoencoderKL (stage 1 of toyworld/ldm.py), then the copy-detection descriptor   toyworld/judge.py
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

minutes() { printf '%d min %02d s' $((SECONDS / 60)) $((SECONDS % 60)); }

echo "step 1: CLIP -> classifier | VAE -> copy descriptor (logs: $LOGS)"
{ "$PY" -m toyworld.clip --out "$OUT/clip" --steps 3000 --batch_size 128 --lr 1e-3 --pool 24000 --seed 0 \
    --eval_n 1000 --threads 1 &&
  "$PY" -m toyworld.judge --out "$OUT/judge" --what judge --seed 0 --threads 1 --no_progress; } \
    >"$LOGS/clip_judge.log" 2>&1 &
first=$!
{ "$PY" -m toyworld.ldm --stage vae "${VAE_ARGS[@]}" --threads 1 &&
  "$PY" -m toyworld.judge --out "$OUT/copydetect" --what copydetect --seed 0 --threads 1 --no_progress; } \
    >"$LOGS/vae_copydetect.log" 2>&1 &
second=$!
status=0
wait "$first" || { status=$?; echo "CLIP or classifier failed (exit $status), see $LOGS/clip_judge.log" >&2; }
wait "$second" || { status=$?; echo "VAE or copy descriptor failed (exit $status), see $LOGS/vae_copydetect.log" >&2; }
[ "$status" -eq 0 ] || exit "$status"
echo "step 1 done after $(minutes)"

echo "step 2: UNet"
"$PY" -m toyworld.ldm --clip "$OUT/clip" "${VAE_ARGS[@]}" --unet_steps 5000 --unet_lr 2e-3 --offset_noise 0.3 \
    --min_snr_gamma 5
echo "step 2 done after $(minutes)"
echo "step 3: quality"
"$PY" -m toyworld.quality --assets "$OUT" --out "$OUT/quality"
echo "all done after $(minutes)"

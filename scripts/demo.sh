#!/usr/bin/env bash
# The main job on real images, end to end: export a bundle from good parts, score held-out test images with the
# torch-free runtime (JSON lines + heat maps on disk), evaluate, and print a summary.
# Data: ../shared/data/mvtec_ad/bottle when present, else solar cells from the elpv-dataset package.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
BOTTLE=../shared/data/mvtec_ad/bottle
if [ -d "$BOTTLE/train/good" ]; then
  DATA=$BOTTLE
else
  python scripts/prepare_elpv.py "$OUT/elpv"
  DATA=$OUT/elpv
fi
echo "== export: $DATA/train/good -> $OUT/bundle"
patchcore-edge export "$DATA/train/good" -o "$OUT/bundle" --force
echo "== run: $DATA/test -> $OUT/run (JSON lines + heat maps)"
mkdir -p "$OUT/run"
patchcore-edge run "$OUT/bundle" "$DATA/test" -o "$OUT/run" --jsonl "$OUT/run/results.jsonl"
echo "first result line:"; head -n 1 "$OUT/run/results.jsonl"
echo "== eval: $DATA"
patchcore-edge eval "$OUT/bundle" "$DATA" --report "$OUT/eval.json" --pixel-size 256

#!/usr/bin/env bash
# The full-budget cross-validation of issue 19 on the GPU machine (`device` tool; read ../shared/device/README.md):
# the default recipe (params.yaml) and its finalist, the Dice loss per lesion image ("imgdice": train.dice: image;
# reports/recipes.md), 5 folds each at the default's 50 epochs, all ten folds at once (bench/folds_at_once.py), then
# each scored on its out-of-fold predictions with its crop networks. About 8 minutes (estimated from docs/team.md's
# packing figures: 10 folds at once, 2 threads each). Compare: python bench/paired.py
# screen/imgdice/oof_per_image.csv screen/default/oof_per_image.csv --splits data/splits.csv
# Prepare here, from the project root, after `dvc repro preprocess`:
#   bash ../shared/device/wheels.sh .whl && echo .whl >> .git/info/exclude
#   tar -cJf .data.tar.xz data/processed data/masks data/splits.csv && echo .data.tar.xz >> .git/info/exclude
# then run `bash bench/device_cv.sh` with carry [".whl", ".data.tar.xz"]; $OUT/results.tar.gz comes back with each
# recipe's cv.json, test.json, oof_per_image.csv and per_image.csv, and every fold's history and log.
# A tiny trial here on the CPU: EPOCHS=1 EXTRA='train.max_train_images: 16' SCORE_SECONDS=900 bash bench/device_cv.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
if ! python3 -c 'import mlflow, segmentation_models_pytorch, albumentations' 2>/dev/null; then  # not there
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
[ -f .data.tar.xz ] && tar -xJf .data.tar.xz
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
epochs=${EPOCHS:-50}
extra=${EXTRA:+, $EXTRA}  # more changes for every recipe
cat > /tmp/default.yaml <<YAML
default: {train.epochs: $epochs$extra}
YAML
cat > /tmp/imgdice.yaml <<YAML
imgdice: {train.epochs: $epochs, train.dice: image$extra}
YAML

# Both recipes' folds at once, each recipe in its own process group (so that one can be stopped alone).
setsid python3 bench/folds_at_once.py --out screen --grid /tmp/default.yaml --threads 2 > "$OUT/folds-default.txt" 2>&1 &
default=$!
setsid python3 bench/folds_at_once.py --out screen --grid /tmp/imgdice.yaml --threads 2 > "$OUT/folds-imgdice.txt" 2>&1 &
imgdice=$!
deadline=$((SECONDS + ${FOLD_SECONDS:-360}))
while kill -0 $default 2>/dev/null; do
  sleep 10; [ $((SECONDS % 60)) -lt 10 ] || continue
  echo "--- $SECONDS s"; for f in screen/*/folds/fold-*/log.txt; do echo "$f: $(grep '^epoch' "$f" | tail -1 | cut -c1-160)"; done
  if [ $SECONDS -gt $deadline ]; then echo "deadline: stopping every fold"; kill -- -$default -$imgdice; break; fi
done
wait $default; echo "default folds: exit $?"
while kill -0 $imgdice 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
kill -- -$imgdice 2>/dev/null; wait $imgdice; echo "imgdice folds: exit $?"

# Score each recipe in its own process and tracking store (parallel sqlite writers lock each other out).
for name in default imgdice; do
  MLFLOW_TRACKING_URI=sqlite:///$PWD/screen/$name.db timeout ${SCORE_SECONDS:-170} \
    python3 -m busi cross-validate --out screen --grid /tmp/$name.yaml > "$OUT/score-$name.txt" 2>&1 &
done
wait
tail -n 3 "$OUT"/score-*.txt
tar -czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='*.db' --exclude='predictor' --exclude='mlruns' screen
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU check of issue 11, for the `device` tool (read ../shared/device/README.md): the parallel-training
# scaling on CUDA (1, 2, 4 workers sharing one GPU), then a cross-validation of the default configuration at
# 128 px, all within about 8 minutes. Prepare here, from the project root, after `dvc repro preprocess`:
#   bash ../shared/device/wheels.sh .whl && echo .whl >> .git/info/exclude
#   tar -cJf .data.tar.xz data/processed data/masks data/splits.csv && echo .data.tar.xz >> .git/info/exclude
# then run it with carry [".whl", ".data.tar.xz"] and command `bash bench/device.sh`; results come back in $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=src:/tmp/site MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db
tar -xJf .data.tar.xz
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 bench/parallel_scaling.py --workers 1 2 4 --images 512 --epochs 2 | tee "$OUT/scaling.txt"
sed -i 's/^  epochs: .*/  epochs: 20/' params.yaml  # the fold budget that fits the device time
timeout 300 python3 -m busi cross-validate --out cv/results 2>&1 | tail -5 | tee "$OUT/cv.txt" || true
cp cv/results/cv.json cv/results/test.json "$OUT/" 2>/dev/null || true

#!/usr/bin/env bash
# The study grid, cross-validated: the study's five rows (VGG16, VGG19, ResNet50 and DPN68 with scSE attention,
# ResNet50 without) and the project's default (resnet18 with attention), each `dvc repro cv/dvc.yaml` as a queued
# DVC experiment with the same settings, then N workers sharing the cores. Then `python -m busi report`.
#   bash cv/queue_study.sh [workers] [-S param=value ...]     e.g. bash cv/queue_study.sh 2 -S train.epochs=20
set -euo pipefail
workers=${1:-1}
shift || true
for encoder in vgg16 vgg19 resnet50 dpn68 resnet18; do
  dvc exp run --queue cv/dvc.yaml -n "cv-$encoder" -S "model.encoder=$encoder" -S model.attention=scse "$@"
done
dvc exp run --queue cv/dvc.yaml -n cv-resnet50-plain -S model.encoder=resnet50 -S model.attention=null "$@"
OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 )) dvc queue start -j "$workers"
echo "queued 6 cross-validations; follow them with: dvc queue status, dvc queue logs <name>; then: busi report"

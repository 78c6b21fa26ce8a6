#!/bin/bash
# The speed tables of docs/results.md on this machine, one benchmark.py run each (stop training jobs first):
# width 0.25 and full-width VGG16-BN (training step float vs QAT, every inference path) and the CIFAR
# MobileNetV2 (per-channel weights); the training step with learned ranges. benchmark.py runs on every core:
# a training job beside it slows both ~15x.
# usage: benchmarks/speed.sh [OUT_DIR]   (about 15-25 minutes on a 2-core CPU; finished tables are kept)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; mkdir -p $O
bench() {  # bench NAME [benchmark.py flags...]
  local n=$1; shift
  [ -f $O/$n.txt ] || { python scripts/benchmark.py "$@" > $O/$n.tmp && mv $O/$n.tmp $O/$n.txt; }
  tail -n 20 $O/$n.txt
}
bench speed-w025 --config configs/cifar10_vgg16_w025.yaml --repeats 5
bench speed-vgg16 --config configs/cifar10_vgg16.yaml --repeats 3
bench speed-mnv2 --config configs/cifar10_mobilenetv2.yaml --per-channel --repeats 3
# the training step with learned ranges (LSQ, per-channel weight steps), compiled and stock
bench speed-w025-lsq --config configs/cifar10_vgg16_w025.yaml --range lsq --per-channel --inference 0 --repeats 7
bench speed-mnv2-lsq --config configs/cifar10_mobilenetv2.yaml --range lsq --per-channel --inference 0 --repeats 7

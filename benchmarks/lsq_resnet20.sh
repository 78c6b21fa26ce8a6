#!/bin/bash
# Learned ranges (LSQ) at 4, 3 and 2 bits on ResNet-20 (gluoncv cifar_resnet20_v1, converted; docs/results.md):
# its float recipe (configs/cifar10_resnet20.yaml, 10 epochs), then the per-channel LSQ + distillation recipe
# of benchmarks/lsq_per_channel.sh (first and last layers at 8 bits, 10 QAT epochs, weight decay halved at 3
# bits and quartered at 2): W4A4 with the residual adds at 4 bits too (seeds 0 and 1), then with the adds at
# 8 bits (--add-bits 8, the convolutions' inputs at the stated width) at W4A4 (seeds 0 and 1), W3A3 (10 and
# 20 QAT epochs) and W2A2 (from LSQ's own initialization, 20 QAT epochs); each run through the simulated and
# integer-only engines.
# usage: benchmarks/lsq_resnet20.sh [OUT_DIR]   (one core: float 3.9-4.4 min an epoch, QAT 4.0-6.2;
# finished runs are skipped, started ones continue with --resume)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; C=configs/cifar10_resnet20.yaml; F=$O/r20-fp32-s0
if [ ! -f $F/result.json ]; then
  if [ -f $F/state.json ]; then python scripts/train_fp32.py --resume $F; else python scripts/train_fp32.py --config $C --out $O --name r20-fp32-s0; fi
fi
. benchmarks/lib.sh
PC="--first-last-bits 8 --range lsq --distill 4 --distill-weight 0.5 --per-channel 1 --epochs 10"
qat r20-lsq-kd-pc-w4a4-e10-s0 --weight-bits 4 --act-bits 4 $PC
qat r20-lsq-kd-pc-w4a4-e10-s1 --weight-bits 4 --act-bits 4 --seed 1 $PC
PC="$PC --add-bits 8"
qat r20-lsq-kd-pc-add8-w4a4-e10-s0 --weight-bits 4 --act-bits 4 $PC
qat r20-lsq-kd-pc-add8-w3a3-e10-s0 --weight-bits 3 --act-bits 3 --wd 0.00005 $PC
qat r20-lsq-kd-pc-add8-w2a2-lsqinit-e20-s0 --weight-bits 2 --act-bits 2 --calib lsq --wd 0.000025 $PC --epochs 20
qat r20-lsq-kd-pc-add8-w4a4-e10-s1 --weight-bits 4 --act-bits 4 --seed 1 $PC
qat r20-lsq-kd-pc-add8-w3a3-e20-s0 --weight-bits 3 --act-bits 3 --wd 0.00005 $PC --epochs 20
echo done

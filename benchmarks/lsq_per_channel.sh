#!/bin/bash
# Learned ranges with per-channel weight steps at 4, 3 and 2 bits (docs/results.md): the 10-epoch LSQ +
# distillation recipe of benchmarks/lsq_cifar.sh (first and last layers at 8 bits) with one learned step per
# output channel, from the same width-0.25 float run; each through the simulated and integer-only engines.
# Weight decay during QAT is halved at 3 bits and quartered at 2 bits (LSQ's choice, Esser et al. 2019).
# usage: benchmarks/lsq_per_channel.sh [OUT_DIR]   (35-70 minutes a run on one core; finished runs are skipped)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; C=configs/cifar10_vgg16_w025.yaml; F=$O/w025-fp32-s0
[ -f $F/result.json ] || python scripts/train_fp32.py --config $C --out $O --name w025-fp32-s0
. benchmarks/lib.sh
PC="--first-last-bits 8 --range lsq --distill 4 --distill-weight 0.5 --per-channel 1 --epochs 10"
qat w025-lsq-kd-pc-w3a3-e10-s0 --weight-bits 3 --act-bits 3 --wd 0.00025 $PC
qat w025-lsq-kd-pc-w2a2-lsqinit-e10-s0 --weight-bits 2 --act-bits 2 --calib lsq --wd 0.000125 $PC
qat w025-lsq-kd-pc-w4a4-e10-s0 --weight-bits 4 --act-bits 4 $PC
qat w025-lsq-kd-pc-w4a4-e10-s1 --weight-bits 4 --act-bits 4 --seed 1 $PC
# 2 bits was still improving at epoch 10: the same run over 20 epochs
qat w025-lsq-kd-pc-w2a2-lsqinit-e20-s0 --weight-bits 2 --act-bits 2 --calib lsq --wd 0.000125 $PC --epochs 20
echo done

#!/bin/bash
# Learned ranges (LSQ) at 4, 3 and 2 bits on CIFAR-10 (docs/results.md): width-0.25 VGG16-BN from its float
# recipe; PTQ max / MSE, EMA-range QAT, LSQ QAT and LSQ QAT with distillation at W4A4, W3A3 and W2A2 (first
# and last layers at 8 bits), 3 QAT epochs each, and W4A4 LSQ on a second seed; then LSQ + distillation over
# 10 QAT epochs at W4A4 (seeds 0 and 1) and W3A3, and at W2A2 from LSQ's own initialization (--calib lsq,
# 3 and 10 epochs); every LSQ + distillation run through the simulated and integer-only engines.
# usage: benchmarks/lsq_cifar.sh [OUT_DIR]   (about three hours on a 2-core CPU; finished steps are skipped)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; C=configs/cifar10_vgg16_w025.yaml; F=$O/w025-fp32-s0
[ -f $F/result.json ] || python scripts/train_fp32.py --config $C --out $O --name w025-fp32-s0
[ -f $O/w025-lsq-sweep-s0/sweep.md ] || python scripts/sweep_bits.py --config $C --pretrained $F --out $O \
  --name w025-lsq-sweep-s0 --pairs 4/4,3/3,2/2 --first-last-bits 8 --epochs 3 --lsq
[ -f $O/w025-lsq-w4a4-s1/result.json ] || python scripts/train_qat.py --config $C --pretrained $F --out $O \
  --name w025-lsq-w4a4-s1 --seed 1 --weight-bits 4 --act-bits 4 --first-last-bits 8 --epochs 3 --range lsq
. benchmarks/lib.sh
LSQ="--first-last-bits 8 --range lsq --distill 4 --distill-weight 0.5"
qat w025-lsq-kd-w4a4-e10-s0 --weight-bits 4 --act-bits 4 --epochs 10 $LSQ
qat w025-lsq-kd-w4a4-e10-s1 --weight-bits 4 --act-bits 4 --epochs 10 --seed 1 $LSQ
qat w025-lsq-kd-w2a2-lsqinit-s0 --weight-bits 2 --act-bits 2 --epochs 3 --calib lsq $LSQ
qat w025-lsq-kd-w3a3-e10-s0 --weight-bits 3 --act-bits 3 --epochs 10 $LSQ
qat w025-lsq-kd-w2a2-lsqinit-e10-s0 --weight-bits 2 --act-bits 2 --epochs 10 --calib lsq $LSQ
echo done

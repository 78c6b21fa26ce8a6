#!/bin/bash
# The CIFAR-10 tables of docs/results.md besides the full-width VGG16 (benchmarks/full_width.sh): width 0.25
# VGG16-BN, the pre-activation ResNet-20 and MobileNetV2 (width 0.5), each float, QAT and every variant.
# usage: benchmarks/cifar_models.sh [OUT_DIR [MODEL...]]   MODEL: w025 r20v2 mnv2 (default all three; hours on a
# 2-core CPU; finished steps are skipped)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; shift || true; M=" ${*:-w025 r20v2 mnv2} "
step() {  # step NAME CONFIG [train_qat flags...]: float run NAME-fp32-s0, QAT run NAME-qat-s0, compare
  local n=$1 c=$2; shift 2
  [ -f $O/$n-fp32-s0/result.json ] || python scripts/train_fp32.py --config $c --out $O --name $n-fp32-s0
  [ -f $O/$n-qat-s0/result.json ] || python scripts/train_qat.py --pretrained $O/$n-fp32-s0 --out $O --name $n-qat-s0 "$@"
  [ -f $O/$n-qat-s0/compare.json ] || python scripts/compare.py --float $O/$n-fp32-s0 --qat $O/$n-qat-s0
}
[[ $M == *" w025 "* ]] && step w025 configs/cifar10_vgg16_w025.yaml
[[ $M == *" r20v2 "* ]] && step r20v2 configs/cifar10_resnet20_v2.yaml
[[ $M == *" mnv2 "* ]] || { echo done; exit 0; }
step mnv2 configs/cifar10_mobilenetv2.yaml --per-channel 1   # QAT with every layer per channel
for pc in 0 1; do  # PTQ with every layer per tensor, then per channel
  [ -f $O/mnv2-ptq-pc$pc-s0/sweep.json ] || python scripts/sweep_bits.py --config configs/cifar10_mobilenetv2.yaml \
    --pretrained $O/mnv2-fp32-s0 --out $O --name mnv2-ptq-pc$pc-s0 --pairs 8/8,4/8 --per-channel $pc --skip-qat
done
[ -f $O/mnv2-qat-w4a8-s0/result.json ] || python scripts/train_qat.py --pretrained $O/mnv2-fp32-s0 --out $O \
  --name mnv2-qat-w4a8-s0 --weight-bits 4 --act-bits 8 --per-channel 1
echo done

#!/bin/bash
# Mixed precision from the sensitivity tool against uniform W4A8 (docs/results.md): width-0.25 VGG16-BN from
# its float recipe; per-layer sensitivity of the weights to 4 and 2 bits, and to 4, 3 and 2 bits (inputs at 8),
# widths for a budget of 400,000 packed weight bytes (uniform 4-bit weights: 468,696), then LSQ QAT with
# distillation, 3 epochs, of both mixed models and of uniform W4A8, each through the simulated and integer-only
# engines.
# usage: benchmarks/mixed_precision.sh [OUT_DIR] [SEED]   (about an hour on a 2-core CPU; finished steps are skipped)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; S=${2:-0}; C=configs/cifar10_vgg16_w025.yaml; F=$O/w025-fp32-s0
[ -f $F/result.json ] || python scripts/train_fp32.py --config $C --out $O --name w025-fp32-s0
[ -f $O/w025-sens-s0/layer_bits.yaml ] || python scripts/sensitivity.py --pretrained $F --budget-bytes 400000 \
  --out $O --name w025-sens-s0
[ -f $O/w025-sens432-s0/layer_bits.yaml ] || python scripts/sensitivity.py --pretrained $F --widths 4,3,2 \
  --budget-bytes 400000 --out $O --name w025-sens432-s0
. benchmarks/lib.sh
LSQ="--seed $S --epochs 3 --range lsq --distill 4 --distill-weight 0.5"
qat w025-mixed-400k-s$S --layer-bits $O/w025-sens-s0/layer_bits.yaml $LSQ
qat w025-mixed432-400k-s$S --layer-bits $O/w025-sens432-s0/layer_bits.yaml $LSQ
qat w025-lsq-kd-w4a8-s$S --weight-bits 4 --act-bits 8 $LSQ
echo done

#!/bin/bash
# W4A4 recipe knobs on the synthetic set: per seed, one float run, then one QAT run per knob line
# usage: benchmarks/knobs_w4a4.sh [OUT_DIR]   (about 10 min here; tabulate with scripts/summarize.py OUT_DIR/k*)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs/knobs}; C=configs/synthetic_tiny.yaml
for s in 0 1; do
  python scripts/train_fp32.py --config $C --out $O --name fp-s$s --seed $s > /dev/null 2>&1
  i=0
  while IFS= read -r knob; do
    python scripts/train_qat.py --config $C --pretrained $O/fp-s$s --out $O --name k$i-s$s --seed $s --weight-bits 4 --act-bits 4 $knob > /dev/null 2>&1
    echo "k$i s$s $knob" >> $O/index.txt
    i=$((i+1))
  done <<'KNOBS'
--epochs 2
--epochs 2 --lr 0.01
--epochs 2 --lr 0.02
--epochs 2 --lr 0.01 --ste clipped
--epochs 2 --lr 0.01 --delay-steps 31
--epochs 2 --lr 0.01 --freeze-ranges-step 31
--epochs 2 --lr 0.01 --first-last-bits 8
--epochs 4 --lr 0.01
KNOBS
done
echo done >> $O/index.txt

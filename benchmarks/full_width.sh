#!/bin/bash
# The original experiment at full width (docs/results.md): float VGG16-BN without augmentation, QAT W8A8
# per tensor and per channel, every int8 engine, PTQ vs QAT at W4A8 and W4A4, the speed tables (full width and
# width 0.25, the ONNX export for this CPU's kernels and for AVX2's).
# usage: benchmarks/full_width.sh [OUT_DIR [FLOAT_RUN]]   (hours on a 2-core CPU; every step resumes or is skipped
# when done; FLOAT_RUN, default OUT_DIR/vgg16-noaug-fp32-s0, names a float run of the config to start from)
set -e
cd "$(dirname "$0")/.." && . .venv/bin/activate
O=${1:-runs}; C=configs/cifar10_vgg16.yaml; F=${2:-$O/vgg16-noaug-fp32-s0}
if [ ! -f $F/result.json ]; then
  if [ -f $F/state.json ]; then python scripts/train_fp32.py --resume $F; else python scripts/train_fp32.py --config $C --out $(dirname $F) --name $(basename $F); fi
fi
qat() {  # qat 0|1 (per channel): QAT from the float run, every int8 engine, the comparison table
  local Q=$O/vgg16-noaug-qat-$([ $1 = 1 ] && echo pc || echo pt)-s0
  if [ ! -f $Q/result.json ]; then
    if [ -f $Q/state.json ]; then python scripts/train_qat.py --resume $Q; else python scripts/train_qat.py --pretrained $F --per-channel $1 --out $O --name $(basename $Q); fi
  fi
  [ -f $Q/int8_eval.json ] || python scripts/sim_int8_infer.py --qat $Q --engine all --export $Q/model.int8.npz --onnx $Q/model.qdq.onnx
  [ -f $Q/compare.json ] || python scripts/compare.py --float $F --qat $Q
}
qat 0  # the original's setting (per tensor) first, then its speed table, then the rest
[ -f $O/benchmark-vgg16.txt ] || { python scripts/benchmark.py --config $C --repeats 3 > $O/benchmark.tmp && mv $O/benchmark.tmp $O/benchmark-vgg16.txt; }
qat 1
[ -f $O/vgg16-noaug-sweep-s0/sweep.json ] || python scripts/sweep_bits.py --config $C --pretrained $F --out $O --name vgg16-noaug-sweep-s0 --pairs 4/8,4/4
python scripts/benchmark.py --config configs/cifar10_vgg16_w025.yaml --repeats 5 > $O/benchmark-w025.txt
python scripts/benchmark.py --config configs/cifar10_vgg16_w025.yaml --repeats 5 --onnx-target avx2 --inference 1 > $O/benchmark-w025-avx2.txt
echo done

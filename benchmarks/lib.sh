# Sourced by the benchmark scripts; the caller sets O (output folder), C (config) and F (float run folder).
qat() {  # qat NAME [train_qat flags...]: run, resume, or skip when finished; then the simulated and integer-only engines
  local n=$1; shift
  if [ ! -f $O/$n/result.json ]; then
    if [ -f $O/$n/state.json ]; then python scripts/train_qat.py --resume $O/$n; else
      python scripts/train_qat.py --config $C --pretrained $F --out $O --name $n "$@"; fi
  fi
  [ -f $O/$n/int8_eval.json ] || python scripts/sim_int8_infer.py --qat $O/$n --engine both
}

# Sourced by scripts/strength-sweep.sh and scripts/strength-gate.sh: an expert at strength t is the mix
# `mix:e=t,base=1-t` (the base model's share has z = 1), for each t in $STRENGTHS.
at() { # expert strength -> adaptation
  python3 -c 'import sys; e, t = sys.argv[1], float(sys.argv[2]); print(f"mix:{e}={t:g},base={1 - t:g}")' "$1" "$2"
}
adaptations() { # expert... -> --adaptation flags: base, then each expert at 1 and each strength
  local out=(--adaptation base)
  for e in "$@"; do
    out+=(--adaptation "$e")
    for t in $STRENGTHS; do out+=(--adaptation "$(at "$e" "$t")"); done
  done
  echo "${out[@]}"
}

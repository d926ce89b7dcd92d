#!/usr/bin/env bash
# The GPU machine's side of a visit: put back together what scripts/gpu-pack.sh carried into .remote/, then
# run scripts/gpu-check.sh into $OUT (the device tool brings $OUT back). Extra environment passes through to
# gpu-check.sh (SKIP, SHAPES, DEVICE).
#
#   bash scripts/gpu-visit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
R=.remote
for need in "$R/gpu-bin.tar.xz" "$R/model.sha256" "$R/model.part-00"; do
    [[ -f $need ]] || { echo "error: $need did not arrive (carry every call's pieces, in a row)" >&2; exit 1; }
done
# Python's tarfile reads xz without an xz binary, which the machine may lack.
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$R/gpu-bin.tar.xz" "$R/bin"
model=$(awk '{print $2}' "$R/model.sha256")
cat "$R"/model.part-* >"$R/$model"
(cd "$R" && sha256sum -c --quiet model.sha256) || {
    echo "error: the model's parts do not add up to its sha256 (a part is missing or stale)" >&2
    exit 1
}
bash scripts/gpu-check.sh "$R/bin/t2" "$R/$model" "$OUT/gpu-check"

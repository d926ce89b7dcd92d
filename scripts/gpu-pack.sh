#!/usr/bin/env bash
# Packs what a visit to the GPU machine needs into .remote/ (git-ignored), in pieces the device tool can carry:
# it takes at most 64 MiB a call, and the machine goes back after ~30 s idle, so the visit is a few calls in a
# row, each carrying its pieces, and the last one running scripts/gpu-visit.sh (which unpacks and checks).
#
#   bash scripts/gpu-pack.sh [BINARY]     (default: target/cuda/release/t2, what scripts/build-cuda.sh builds)
#
# Pieces: gpu-bin.tar.xz (the stripped binary and ../shared/gpu/with-gpu-libs.sh) and the default model split
# into parts; each call's list is printed at the end, together under 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/cuda/release/t2}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
WRAP=../shared/gpu/with-gpu-libs.sh
CALL_MIB=60
[[ -x $BIN ]] || { echo "error: no binary at $BIN (bash scripts/build-cuda.sh)" >&2; exit 1; }
# A cpu-only binary would fail on the machine after the transfer; tell it here instead.
grep -q "cuModuleLoadData\|libcuda" "$BIN" || { echo "error: $BIN was not built with --features cuda" >&2; exit 1; }
[[ -f $MODEL ]] || { echo "error: $MODEL missing (bash scripts/fetch-model.sh)" >&2; exit 1; }
[[ -f $WRAP ]] || { echo "error: $WRAP missing" >&2; exit 1; }

rm -rf .remote && mkdir -p .remote/stage
cp "$BIN" .remote/stage/t2
strip .remote/stage/t2
cp "$WRAP" .remote/stage/
echo "packing the binary ($(du -m .remote/stage/t2 | cut -f1) MiB stripped; xz -9 takes a minute or two)"
tar -C .remote/stage -cf - t2 with-gpu-libs.sh | xz -9 -T2 >.remote/gpu-bin.tar.xz
rm -rf .remote/stage
(cd "$(dirname "$MODEL")" && sha256sum "$(basename "$MODEL")") >.remote/model.sha256

mib() { echo $((($(stat -c %s "$1") + 1048575) / 1048576)); }
bin_mib=$(mib .remote/gpu-bin.tar.xz)
# The first call carries the binary beside the first model part; the rest fill whole calls.
first=$((CALL_MIB - bin_mib))
((first > 0)) || { echo "error: the packed binary alone is $bin_mib MiB" >&2; exit 1; }
head -c $((first * 1048576)) "$MODEL" >.remote/model.part-00
tail -c +$((first * 1048576 + 1)) "$MODEL" | split -b $((CALL_MIB * 1048576)) -a 2 \
    --numeric-suffixes=1 - .remote/model.part-

echo "calls (run each at once after the last; carry lists, paths from the repository root):"
echo "  1: .remote/gpu-bin.tar.xz .remote/model.sha256 .remote/model.part-00  ($((bin_mib + $(mib .remote/model.part-00))) MiB)"
n=2
shopt -s nullglob
for part in .remote/model.part-0[1-9]; do
    echo "  $n: $part  ($(mib "$part") MiB)"
    n=$((n + 1))
done
echo "  the last call's command: bash scripts/gpu-visit.sh (it checks that every piece arrived)"

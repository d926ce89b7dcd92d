#!/usr/bin/env bash
# Copies trained experts (from `scripts/train-experts.sh`'s OUT folder) into experts/<model-id>/ with their
# training logs and curves, and merges their manifest entries into the store's manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: install-experts.sh OUT}
python3 - "$OUT" <<'PYEOF'
import json, os, shutil, sys
out = sys.argv[1]
for store in sorted(d for d in os.listdir(out) if d.startswith("store-")):
    for model_id in os.listdir(os.path.join(out, store)):
        src = os.path.join(out, store, model_id)
        dst = os.path.join("experts", model_id)
        os.makedirs(dst, exist_ok=True)
        mpath = os.path.join(dst, "manifest.json")
        manifest = json.load(open(mpath)) if os.path.exists(mpath) else {"model_id": model_id, "experts": [], "mixes": []}
        for entry in json.load(open(os.path.join(src, "manifest.json")))["experts"]:
            shutil.copy(os.path.join(src, entry["file"]), os.path.join(dst, entry["file"]))
            run = os.path.join(out, "runs", entry["name"])
            for f, suffix in (("log.csv", ".log.csv"), ("curve.svg", ".curve.svg")):
                if os.path.exists(os.path.join(run, f)):
                    shutil.copy(os.path.join(run, f), os.path.join(dst, entry["name"] + suffix))
            manifest["experts"] = [e for e in manifest["experts"] if e["name"] != entry["name"]] + [entry]
            print("installed", entry["name"], "into", dst)
        tmp = mpath + ".tmp"
        json.dump(manifest, open(tmp, "w"), indent=2)
        os.replace(tmp, mpath)
PYEOF

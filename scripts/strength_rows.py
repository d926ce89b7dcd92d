"""Shared by scripts/strength-sweep.sh and scripts/strength-gate.sh: an expert at strength t is the mix
`mix:e=t,base=1-t`, and eval rows are read under one spelling per adaptation."""

import json
import os


def key(adaptation: str) -> str:
    """One spelling per adaptation: a mix's weights sorted by expert, rounded."""
    if not adaptation.startswith("mix:"):
        return adaptation
    w = sorted((kv.split("=")[0], round(float(kv.split("=")[1]), 4)) for kv in adaptation[4:].split(","))
    return "mix:" + ",".join(f"{k}={v:g}" for k, v in w)


def at_strength(expert: str, t: float) -> str:
    """The adaptation key of `expert` at strength t (t = 1: the expert itself)."""
    return expert if t == 1.0 else key(f"mix:{expert}={t:g},base={1 - t:g}")


def rows(d: str, tasks) -> dict:
    """Each task's eval rows in d/<task>.json, by adaptation key."""
    return {t: {key(r["adaptation"]): r for r in json.load(open(os.path.join(d, f"{t}.json")))} for t in tasks}

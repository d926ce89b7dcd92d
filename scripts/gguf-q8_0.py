#!/usr/bin/env python3
"""A Q8_0 copy of a GGUF model for the peer: every 2-D weight whose rows are whole 32-blocks is dequantized
and requantized to Q8_0 (the scheme `t2 --dtype q8_0` uses: one scale per 32 weights, max |w| -> 127), the
rest (norms) stay F32. Benchmarks only: llama-bench on this file is the Q8_0 side of the comparison.

    ~/lab/venvs/tools/bin/python scripts/gguf-q8_0.py IN.gguf OUT.gguf   (needs the gguf and numpy packages)
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

MOSTLY_Q8_0 = 7  # llama_ftype (llama.h)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: gguf-q8_0.py IN.gguf OUT.gguf", file=sys.stderr)
        return 2
    src, dst = sys.argv[1:]
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(dst, arch=arch, endianess=r.endianess)
    for f in r.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        st = f.types[-1] if vt == V.ARRAY else None
        val = MOSTLY_Q8_0 if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
        w.add_key_value(f.name, val, vt, sub_type=st)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        data = np.asarray(t.data)
        arr = (data if t.tensor_type in (Q.F32, Q.F16) else gguf.quants.dequantize(data, t.tensor_type))
        arr = arr.astype(np.float32).reshape(shape)
        if arr.ndim == 2 and shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr, Q.Q8_0)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

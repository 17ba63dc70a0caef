#!/usr/bin/env python3
"""Regenerates compress/calib/default.txt, the default calibration text of `lorcserve compress
--whiten` (README.md "Calibration"). Deterministic; needs only python3 and its standard library
sources (Debian: /usr/lib/python3.11, package libpython3.11-stdlib).

Content, in this order (about 60% Python source, 30% pass-key retrieval samples, 10% prose):
  1. prose.txt: generic English prose written for this repository (the former default.txt).
  2. Excerpts of Python standard-library modules (PSF licence; see README.md "Calibration").
  3. Synthetic pass-key samples: Python standard-library source as filler with four facts
     "The pass key of NAME is NNNNN." inserted at random character positions and a closing
     "Question: what is the pass key of NAME? Answer: the pass key of NAME is NNNNN." Names are
     made from syllables here; numbers are random. Same shape as the fixture's training samples.
Never the fixture's evaluation windows or pass-key prompts: `--check DIR` verifies that no
64-character span of the output with at least 16 letters or digits occurs in the texts of
DIR/eval_ppl_windows.jsonl / eval_passkey.jsonl (decoded with DIR/tokenizer.json); shorter or
emptier spans (indentation, "=====" rulers, "else:") are common to all Python code.

Usage: make_default.py [--stdlib DIR] [--check MODEL_DIR] > default.txt
"""
import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (module file, first byte, length): modules with docstrings, doctest examples and numeric code.
EXCERPTS = [
    ("statistics.py", 0, 26000),
    ("fractions.py", 0, 16000),
    ("random.py", 2000, 14000),
    ("textwrap.py", 0, 9000),
    ("heapq.py", 0, 8000),
    ("bisect.py", 0, 3000),
    ("colorsys.py", 0, 4000),
    ("_pydecimal.py", 30000, 12000),
    ("datetime.py", 4000, 10000),
    ("difflib.py", 0, 12000),
]
FILLER = ["calendar.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "copy.py",
          "numbers.py", "operator.py", "pprint.py", "reprlib.py", "cmd.py", "graphlib.py"]
SYLLABLES = ["bra", "cor", "del", "fen", "gil", "hom", "ist", "jun", "kel", "lor", "mar", "nid",
             "ost", "pel", "quo", "ran", "sil", "tor", "umb", "vel", "wen", "yar", "zel", "tam"]
NUM_SAMPLES = 28
SAMPLE_CHARS = 2600


def read(stdlib, name):
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
        return f.read()


def passkey_samples(stdlib, rng):
    out = []
    for i in range(NUM_SAMPLES):
        src = read(stdlib, FILLER[i % len(FILLER)])
        start = rng.randrange(0, max(1, len(src) - SAMPLE_CHARS))
        filler = src[start:start + SAMPLE_CHARS]
        facts = []
        while len(facts) < 4:
            name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()
            if name not in [n for n, _ in facts]:
                facts.append((name, "%05d" % rng.randrange(10000, 100000)))
        cuts = sorted(rng.randrange(0, len(filler)) for _ in facts)
        text, prev = "", 0
        for (name, key), cut in zip(facts, cuts):
            text += filler[prev:cut] + " The pass key of %s is %s." % (name, key)
            prev = cut
        text += filler[prev:]
        name, key = rng.choice(facts)
        text += "\n\nQuestion: what is the pass key of %s? Answer: the pass key of %s is %s.\n" % (
            name, name, key)
        out.append(text)
    return out


def decode_fn(model_dir):
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    vocab = {v: k for k, v in tok["model"]["vocab"].items()}
    for a in tok.get("added_tokens", []):
        vocab[a["id"]] = a["content"]
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    def decode(ids):
        raw = bytearray()
        for i in ids:
            t = vocab[i]
            if not t.startswith("<|"):
                raw += bytes(byte_of[ch] for ch in t)
        return raw.decode("utf-8", "replace")
    return decode


def check(text, model_dir, span=64):
    decode = decode_fn(model_dir)
    grams = set()
    for fname, key in (("eval_ppl_windows.jsonl", "ids"), ("eval_passkey.jsonl", "prompt_ids")):
        for line in open(os.path.join(model_dir, fname), encoding="utf-8"):
            t = decode(json.loads(line)[key])
            grams.update(t[i:i + span] for i in range(0, len(t) - span + 1))
    # Spans of indentation and ruler lines ("=====", "    else:") are common to all Python code.
    return [i for i in range(len(text) - span + 1)
            if text[i:i + span] in grams and sum(ch.isalnum() for ch in text[i:i + span]) >= 16]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stdlib", default="/usr/lib/python3.11")
    ap.add_argument("--check", metavar="MODEL_DIR")
    args = ap.parse_args()
    rng = random.Random(20261201)
    parts = [open(os.path.join(HERE, "prose.txt"), encoding="utf-8").read()]
    for name, start, length in EXCERPTS:
        src = read(args.stdlib, name)
        parts.append(src[start:start + length])
    parts += passkey_samples(args.stdlib, rng)
    text = "\n\n".join(p.strip("\n") for p in parts) + "\n"
    if "lorccalib)" in text:
        sys.exit("the text contains the raw-string delimiter of CMakeLists.txt")
    if args.check:
        hits = check(text, args.check)
        if hits:
            sys.exit("%d 64-character spans occur in the evaluation files, e.g. %r" %
                     (len(hits), text[hits[0]:hits[0] + 64]))
        print("checked: no 64-character span of the output occurs in the evaluation files",
              file=sys.stderr)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

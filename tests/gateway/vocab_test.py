"""Token id -> bytes (gateway/lorcserve_gateway/vocab.py) and its GPT-2 byte table, which
fuzz/make_corpus.py shares: the table's order fixes the seed tokenizers' ids, so the committed
seeds must come out of make_corpus unchanged. Run: /usr/bin/python3 tests/gateway/vocab_test.py
(ctest GatewayVocab)."""

import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "gateway"))
sys.path.insert(0, os.path.join(REPO, "fuzz"))

from lorcserve_gateway.vocab import Vocab, bytes_to_unicode  # noqa: E402

import make_corpus  # noqa: E402

MODELS = os.environ.get("LORC_MODELS_DIR") or os.path.join(REPO, "models")


class BytesToUnicodeTest(unittest.TestCase):
    def test_table(self):
        table = bytes_to_unicode()
        self.assertEqual(sorted(table), list(range(256)))
        self.assertEqual(len(set(table.values())), 256)
        # The printable bytes stand for themselves and come first, in byte order.
        self.assertEqual(list(table)[:3], [ord("!"), ord('"'), ord("#")])
        self.assertEqual(table[ord("A")], "A")
        self.assertEqual(table[0xE9], "\u00e9")
        # The others take U+0100 on, in byte order: 0x00 first, space (0x20) is 'Ġ'.
        self.assertEqual(table[0x00], "\u0100")
        self.assertEqual(table[ord(" ")], "\u0120")
        self.assertEqual(table[ord("\n")], "\u010a")
        self.assertEqual(table[0xAD], "\u0143")
        self.assertEqual(list(table)[188:190], [0x00, 0x01])


class VocabTest(unittest.TestCase):
    def test_byte_level_pieces_decode_to_bytes(self):
        tok = {"model": {"vocab": {"Ġthe": 0, "Ċ": 1, "Ã©": 2, "plain": 3}},
               "decoder": {"type": "ByteLevel"},
               "added_tokens": [{"id": 4, "content": "<|eot|>"}]}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(tok, f)
        try:
            v = Vocab.from_tokenizer_json(f.name)
        finally:
            os.unlink(f.name)
        self.assertEqual(v.token_bytes(0), b" the")
        self.assertEqual(v.token_bytes(1), b"\n")
        self.assertEqual(v.token_bytes(2), "é".encode())
        self.assertEqual(v.token_bytes(3), b"plain")
        self.assertEqual(v.token_bytes(4), b"<|eot|>")
        self.assertEqual(v.token_text(99), "token_id:99")

    def test_token_name_of_partial_characters(self):
        # OpenAI's completions convention: distinct "bytes:\\xNN" names, not one U+FFFD.
        v = Vocab({1: b"\xe4", 2: b"\xb8\xad", 3: "\u4e2d".encode(), 4: b" a"})
        self.assertEqual([v.token_name(i) for i in (1, 2, 3, 4)],
                         ["bytes:\\xe4", "bytes:\\xb8\\xad", "\u4e2d", " a"])
        self.assertEqual(v.token_text(1), "\ufffd")  # chat's token text (bytes are exact)
        self.assertEqual(v.token_name(99), "token_id:99")

    def test_decode_joins_bytes_before_utf8(self):
        # An echoed token-id prompt's text: a character split over two tokens is whole again;
        # special tokens read as their content; a lone partial byte is U+FFFD.
        v = Vocab({1: b"\xe4", 2: b"\xb8\xad", 3: b"<|begin_of_text|>", 4: b" a"})
        self.assertEqual(v.decode([3, 1, 2, 4]), "<|begin_of_text|>\u4e2d a")
        self.assertEqual(v.decode([4, 1]), " a\ufffd")
        self.assertEqual(v.decode([]), "")
        self.assertFalse(v.empty)
        self.assertTrue(Vocab({}).empty)

    def test_fixture_model(self):
        v = Vocab.from_tokenizer_json(os.path.join(MODELS, "tiny-llama-a", "tokenizer.json"))
        with open(os.path.join(MODELS, "tiny-llama-a", "tokenizer.json"), encoding="utf-8") as f:
            pieces = json.load(f)["model"]["vocab"]
        table = bytes_to_unicode()
        found = 0
        for b, ch in table.items():
            if ch in pieces:
                self.assertEqual(v.token_bytes(pieces[ch]), bytes([b]), ch)
                found += 1
        self.assertEqual(found, 256)


class MakeCorpusTest(unittest.TestCase):
    def test_seed_tokenizers_are_the_committed_ones(self):
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                 "invert": False}
        corpus = os.path.join(REPO, "fuzz", "corpus", "tokenizer_json_fuzz")
        for name, made in [("gpt2_style", make_corpus.tiny_tokenizer(byte_level)),
                           ("split_string", make_corpus.tiny_tokenizer(split, byte_fallback=True))]:
            with open(os.path.join(corpus, name), encoding="utf-8") as f:
                self.assertEqual(made, f.read(), name)
        # The 256 byte symbols take ids 0..255 in the table's order.
        vocab = json.loads(make_corpus.tiny_tokenizer(byte_level))["model"]["vocab"]
        self.assertEqual([vocab[ch] for ch in bytes_to_unicode().values()], list(range(256)))


if __name__ == "__main__":
    unittest.main()

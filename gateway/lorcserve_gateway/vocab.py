"""Token id -> its text and bytes, for the `logprobs` of responses (the gRPC API streams ids).

Read from the model's tokenizer.json (`model.vocab` and `added_tokens`). Byte-level BPE
(GPT-2 / Llama-3: `ByteLevel` decoder) maps each vocabulary character back to its byte;
SentencePiece-style vocabularies (Llama-2: `Metaspace`, `<0xNN>` byte tokens) map `▁` to a space
and byte tokens to their byte. A token that is not whole UTF-8 shows U+FFFD in `text` (chat's
`token`; its `bytes` are exact) and `bytes:\\xNN...` in `token_name` (the completions shape, whose
top_logprobs are keyed by it). Ids the file does not name read `token_id:N` (vLLM's form).
"""

import json


def bytes_to_unicode():
    """GPT-2's bytes_to_unicode: byte (0..255) -> the character byte-level BPE vocabularies
    (GPT-2, Llama-3: `ByteLevel`) spell it with, in GPT-2's order: the printable bytes stand for
    themselves, the other 68 take U+0100 on. The one copy of the table: fuzz/make_corpus.py builds
    its seed tokenizers' alphabet from it (it imports only the standard library)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level_decoder():
    """bytes_to_unicode inverted: vocabulary character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


class Vocab:
    """Immutable after construction."""

    def __init__(self, id_to_bytes, id_to_piece=None):
        self._bytes = id_to_bytes
        self._pieces = id_to_piece or {}

    @classmethod
    def from_tokenizer_json(cls, path):
        """Raises OSError / ValueError for an unreadable or malformed file."""
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        model = tok.get("model") or {}
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {piece[0]: i for i, piece in enumerate(vocab)}
        decoder = json.dumps(tok.get("decoder") or {})
        byte_level = "ByteLevel" in decoder
        table = _byte_level_decoder() if byte_level else None
        id_to_bytes = {}
        id_to_piece = {i: piece for piece, i in vocab.items()}
        for piece, i in vocab.items():
            if byte_level:
                if all(ch in table for ch in piece):
                    id_to_bytes[i] = bytes(table[ch] for ch in piece)
                else:
                    id_to_bytes[i] = piece.encode("utf-8")
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                id_to_bytes[i] = bytes([int(piece[3:5], 16)])
            else:
                id_to_bytes[i] = piece.replace("\u2581", " ").encode("utf-8")
        for added in tok.get("added_tokens") or []:
            id_to_bytes[added["id"]] = added["content"].encode("utf-8")
            id_to_piece[added["id"]] = added["content"]
        return cls(id_to_bytes, id_to_piece)

    @property
    def empty(self):
        """True without a tokenizer.json: every token reads token_id:N."""
        return not self._bytes

    def decode(self, ids):
        """The text of the tokens `ids` together (bytes joined, then UTF-8 with U+FFFD for what
        is not whole characters), special tokens spelled as their content (HF's decode with
        skip_special_tokens off): an echoed token-id prompt's text."""
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    def token_piece(self, token_id):
        """The vocabulary's own string for the token (HF's convert_ids_to_tokens: 'Ġworld' in a
        byte-level vocabulary), as vLLM's /tokenize return_token_strs gives it; the token's text
        for a vocabulary built from bytes alone; token_id:N for an id the file does not name."""
        piece = self._pieces.get(token_id)
        return piece if piece is not None else self.token_text(token_id)

    def token_bytes(self, token_id):
        b = self._bytes.get(token_id)
        return b if b is not None else f"token_id:{token_id}".encode()

    def token_text(self, token_id):
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_name(self, token_id):
        """The token as the completions `logprobs` name it (tokens, top_logprobs keys): its text,
        or for bytes that are not whole UTF-8 on their own (a byte-fallback token, part of a
        character) OpenAI's `bytes:\\xe4\\xb8`, so that such tokens stay distinct keys."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<harness>/ (fuzz/README.md). Deterministic; re-run
after changing a seed here. Regression inputs found by fuzzing live beside the seeds as
crash-<what> files and are not touched. Needs protoc (for the protobuf seeds). Run:
/usr/bin/python3 fuzz/make_corpus.py (the standard library only)."""
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

# GPT-2's byte -> character table, from the gateway (its vocab module imports only json).
sys.path.insert(0, os.path.join(ROOT, "gateway"))
from lorcserve_gateway.vocab import bytes_to_unicode  # noqa: E402


def put(harness, name, data):
    d = os.path.join(CORPUS, harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def encode(message, text, proto, extra_paths=()):
    args = ["protoc", f"--encode={message}", f"--proto_path={ROOT}/proto"]
    args += [f"--proto_path={p}" for p in extra_paths] + [proto]
    return subprocess.run(args, input=text.encode(), check=True, capture_output=True).stdout


def safetensors(tensors, metadata=None, data=b"", raw_header=None):
    header = raw_header
    if header is None:
        h = dict(tensors)
        if metadata is not None:
            h["__metadata__"] = metadata
        header = json.dumps(h).encode()
    return struct.pack("<Q", len(header)) + header + data


def seeds_safetensors():
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    put("safetensors_fuzz", "f32_2x3", safetensors(
        {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, {"format": "pt"}, f32))
    put("safetensors_fuzz", "mixed", safetensors({
        "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]},
        "c": {"dtype": "F32", "shape": [], "data_offsets": [16, 20]},
        "d": {"dtype": "F32", "shape": [0, 3], "data_offsets": [20, 20]},
    }, None, bytes(range(20))))
    put("safetensors_fuzz", "overlap", safetensors({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, bytes(12)))
    put("safetensors_fuzz", "past_end", safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, bytes(8)))
    put("safetensors_fuzz", "huge_shape", safetensors(
        {"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}},
        None, bytes(16)))
    put("safetensors_fuzz", "header_len_too_big", struct.pack("<Q", 1 << 62) + b"{}")
    put("safetensors_fuzz", "short", b"\x02\x00\x00")
    put("safetensors_fuzz", "not_json", safetensors({}, raw_header=b"{\"a\":"))
    put("safetensors_fuzz", "bad_dtype", safetensors(
        {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, None, b"\0"))


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False}


def seeds_config():
    fixture = open(os.path.join(ROOT, "models/tiny-llama-a/config.json")).read()
    put("config_json_fuzz", "tiny_llama_a", fixture)
    put("config_json_fuzz", "tiny", json.dumps(TINY_CONFIG))
    c = dict(TINY_CONFIG, eos_token_id=[1, 2], torch_dtype="bfloat16")
    c.pop("head_dim")
    c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    put("config_json_fuzz", "llama3_rope", json.dumps(c))
    c = dict(TINY_CONFIG, tie_word_embeddings=True)
    c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    put("config_json_fuzz", "linear_rope_tied", json.dumps(c))
    put("config_json_fuzz", "huge_sizes", json.dumps(dict(
        TINY_CONFIG, vocab_size=2**40, hidden_size=2**40, num_hidden_layers=2**30)))
    put("config_json_fuzz", "empty_object", "{}")
    put("config_json_fuzz", "not_object", "[1, 2]")


def seeds_generation_config():
    put("generation_config_json_fuzz", "tiny_llama_a",
        open(os.path.join(ROOT, "models/tiny-llama-a/generation_config.json")).read())
    put("generation_config_json_fuzz", "sampling", json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "min_p": 0.05,
        "repetition_penalty": 1.1, "max_new_tokens": 256, "eos_token_id": [1, 2, 3]}))
    put("generation_config_json_fuzz", "bad_values", json.dumps({
        "temperature": -1, "top_p": 2, "eos_token_id": 99999, "max_new_tokens": 0}))
    put("generation_config_json_fuzz", "wrong_types", json.dumps({
        "do_sample": "yes", "eos_token_id": [1, "2"], "top_k": 1.5}))


def seeds_lorc():
    layers = [{"k_rank": 64, "v_rank": 32}] * 8
    base = {"format": "lorcserve-lorc", "version": 1, "method": "svd", "schedule": "uniform",
            "target": {"kv_ratio": 0.375}, "num_layers": 8, "num_kv_heads": 2, "head_dim": 128,
            "layers": layers, "kv_bytes_ratio": 0.375, "calibration": None,
            "source_model": {"dir": "models/tiny-llama-a", "config_sha256": "00" * 32}}
    put("lorc_json_fuzz", "uniform_svd", json.dumps(base))
    w = dict(base, method="whitened-svd", schedule="progressive",
             layers=[{"k_rank": 8 + 16 * i, "v_rank": 128 - 8 * i} for i in range(8)],
             calibration={"source": "default", "tokens": 4096})
    w.pop("kv_bytes_ratio")
    put("lorc_json_fuzz", "whitened_progressive", json.dumps(w))
    put("lorc_json_fuzz", "rank_too_big", json.dumps(dict(base, layers=[{"k_rank": 200, "v_rank": 1}] * 8)))
    put("lorc_json_fuzz", "wrong_layers", json.dumps(dict(base, layers=layers[:3])))
    put("lorc_json_fuzz", "wrong_types", json.dumps(dict(base, version="1", num_layers=8.5)))


def tiny_tokenizer(pre_tokenizer, post_processor=None, added=None, merges_as_pairs=False,
                   byte_fallback=False):
    # The 256 byte-level symbols (ids in GPT-2's order) plus a few merges.
    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = added or [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False,
                       "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": byte_fallback, "ignore_merges": False,
                  "vocab": vocab,
                  "merges": [list(m) for m in merges] if merges_as_pairs else
                            [f"{a} {b}" for a, b in merges]}})


def seeds_tokenizer_json():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    put("tokenizer_json_fuzz", "gpt2_style", tiny_tokenizer(bl))
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        dict(bl, use_regex=False)]}
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [261], "tokens": ["<|endoftext|>"]}}}
    put("tokenizer_json_fuzz", "llama3_style", tiny_tokenizer(split, template, merges_as_pairs=True))
    put("tokenizer_json_fuzz", "split_string", tiny_tokenizer(
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
         "invert": False}, byte_fallback=True))
    put("tokenizer_json_fuzz", "unsupported_normalizer",
        json.dumps(dict(json.loads(tiny_tokenizer(bl)), normalizer={"type": "NFC"})))
    put("tokenizer_json_fuzz", "empty_object", "{}")


def seeds_tokenizer_text():
    texts = ["Hello world", "<|begin_of_text|>Hi<|end_of_text|>", "'s\nUPPER'S   'll ",
             "  spaces\t\ttabs\r\n", "caf\u00e9 \u4e2d\u6587 \U0001F600", "12345678901234"]
    cases = os.path.join(ROOT, "models/tokenizer-llama3-style/cases_shared.jsonl")
    with open(cases) as f:
        for i, line in enumerate(f):
            if i >= 4:
                break
            texts.append(json.loads(line)["text"][:200])
    for i, t in enumerate(texts):
        put("tokenizer_encode_decode_fuzz", f"text_{i}", bytes([i % 16]) + t.encode())
    put("tokenizer_encode_decode_fuzz", "invalid_utf8", b"\x00ab\xff\xc3(")
    put("tokenizer_encode_decode_fuzz", "ids_in_range", b"\x08" + struct.pack("<8i", 0, 1, 2, 300, 4095, 4096, 200, 17))
    put("tokenizer_encode_decode_fuzz", "ids_raw", b"\x04" + struct.pack("<4i", -1, 2**31 - 1, 0, 5))
    put("tokenizer_encode_decode_fuzz", "split_utf8_ids", b"\x09" + struct.pack("<3i", 195, 169, 20))


LORC = "lorcserve/v1/lorcserve.proto"


def seeds_requests():
    gen = {
        "text": 'text: "Hello, world" sampling { max_tokens: 8 }',
        "ids_n3_seeded": 'token_ids { ids: [0, 5, 6, 7] } sampling { n: 3 seed: 42 temperature: 0.8 top_k: 20 top_p: 0.9 max_tokens: 12 }',
        "stop_strings": 'text: "Once upon" sampling { stop: ["the", "\\n", "e"] include_stop_str_in_output: true min_tokens: 2 max_tokens: 40 }',
        "bias_allowed": 'token_ids { ids: [0, 100, 101] } sampling { logit_bias { key: 105 value: 5 } allowed_token_ids: [100, 101, 102, 1] stop_token_ids: [101] presence_penalty: 0.5 frequency_penalty: -0.5 repetition_penalty: 1.2 }',
        "logprobs": 'text: "abc" sampling { logprobs: 2 prompt_logprobs: 1 max_tokens: 4 }',
        "session": 'request_id: "r1" text: "<|begin_of_text|>Hi" session_id: "s" cache_salt: "salt" priority: 3 sampling { ignore_eos: true max_tokens: 20 }',
        "max_tokens_zero": 'text: "x" sampling { max_tokens: 0 }',
        "n_zero": 'text: "x" sampling { n: 0 }',
        "bad_top_p": 'text: "x" sampling { top_p: 1.5 }',
        "id_outside_vocab": 'token_ids { ids: [0, 99999] }',
        "long_prompt": 'token_ids { ids: [' + ", ".join(str(100 + i % 50) for i in range(260)) + '] }',
        "empty": '',
    }
    for name, text in gen.items():
        put("generate_request_fuzz", name, encode("lorcserve.v1.GenerateRequest", text, LORC))
    # text (field 2) that is not UTF-8: the service's own parser must name it.
    put("generate_request_fuzz", "invalid_utf8_text", b"\x12\x03a\xff\x80")
    put("generate_request_fuzz", "not_a_message", b"\xff\xff\xff\xff")
    tok = {
        "plain": 'text: "Hello world"',
        "special": 'text: "<|begin_of_text|>Hi there" add_special_tokens: true',
        "unicode": 'text: "caf\\303\\251 \\344\\270\\255"',
        "empty": '',
    }
    for name, text in tok.items():
        put("tokenize_request_fuzz", name, encode("lorcserve.v1.TokenizeRequest", text, LORC))
    put("tokenize_request_fuzz", "invalid_utf8", b"\x0a\x02\xc3\x28")


GREEDY = "params { top_p: 1 repetition_penalty: 1 n: 1 max_tokens: 8 }"


def plans(*ps):
    return "\n".join("plan { " + p + " }" for p in ps)


def seeds_steps():
    extra = [os.path.join(ROOT, "fuzz")]
    s = {
        # prefill 6 tokens in 2 blocks of 4, decode twice, finish
        "prefill_decode_finish": plans(
            f"step_id: 1 seqs {{ seq_id: 1 new_token_ids: [0, 5, 6, 7, 8, 9] num_scheduled_tokens: 6 new_block_ids: [0, 1] sample: true {GREEDY} }}",
            "step_id: 2 seqs { seq_id: 1 num_computed_tokens: 6 num_scheduled_tokens: 1 sample: true }",
            "step_id: 3 seqs { seq_id: 1 num_computed_tokens: 7 num_scheduled_tokens: 1 sample: true new_block_ids: [2] }",
            "step_id: 4 finished: [1]"),
        # chunked prefill of two requests, a preemption and re-admission
        "chunked_preempt": plans(
            f"step_id: 1 seqs {{ seq_id: 1 new_token_ids: [0, 3, 4, 5, 6, 7, 8, 9, 10] num_scheduled_tokens: 4 new_block_ids: [0] {GREEDY} }} seqs {{ seq_id: 2 new_token_ids: [0, 11] num_scheduled_tokens: 2 new_block_ids: [3] sample: true params {{ temperature: 0.9 top_k: 5 top_p: 0.8 repetition_penalty: 1.1 has_seed: true seed: 3 n: 1 max_tokens: 4 }} }}",
            "step_id: 2 seqs { seq_id: 1 num_computed_tokens: 4 num_scheduled_tokens: 5 new_block_ids: [1, 2] sample: true }",
            "step_id: 3 preempted: [2] seqs { seq_id: 1 num_computed_tokens: 9 num_scheduled_tokens: 1 sample: true }",
            "step_id: 4 seqs { seq_id: 2 new_token_ids: [0, 11, 12] num_scheduled_tokens: 3 new_block_ids: [4] sample: true }",
            "step_id: 5 finished: [1, 2]"),
        # parallel sampling: a fork with copy-on-write, prompt logprobs
        "fork_cow_logprobs": plans(
            "step_id: 1 seqs { seq_id: 1 new_token_ids: [0, 5, 6, 7, 8, 9] num_scheduled_tokens: 6 new_block_ids: [0, 1] sample: true fork_child_ids: [100, 101] params { temperature: 1 top_p: 1 repetition_penalty: 1 n: 3 has_seed: true seed: 9 prompt_logprobs: true prompt_logprobs_top: 2 has_logprobs: true logprobs_top: 3 max_tokens: 8 } }",
            "step_id: 2 copies { src: 1 dst: 5 } seqs { seq_id: 1 num_computed_tokens: 6 num_scheduled_tokens: 1 sample: true } seqs { seq_id: 100 num_computed_tokens: 6 num_scheduled_tokens: 1 sample: true replace_last_block: 5 } seqs { seq_id: 101 num_computed_tokens: 6 num_scheduled_tokens: 1 sample: true }",
            "step_id: 3 finished: [1, 100, 101]"),
        # host tier: offload a block, load it back
        "host_tier": plans(
            f"step_id: 1 seqs {{ seq_id: 1 new_token_ids: [0, 5, 6, 7] num_scheduled_tokens: 4 new_block_ids: [0] sample: true {GREEDY} }}",
            "step_id: 2 kv_offloads { block: 0 slot: 1 } finished: [1]",
            f"step_id: 3 kv_loads {{ block: 3 slot: 1 }} seqs {{ seq_id: 2 new_token_ids: [0, 5, 6, 7, 8] num_computed_tokens: 4 num_scheduled_tokens: 1 new_block_ids: [3, 4] sample: true {GREEDY} }}"),
        # hostile: bad ids, counts, step order
        "hostile": plans(
            f"step_id: 1 seqs {{ seq_id: 1 new_token_ids: [0, 5000] num_scheduled_tokens: 2 new_block_ids: [0] sample: true {GREEDY} }} seqs {{ seq_id: 2 new_token_ids: [0, 5] num_scheduled_tokens: 2 new_block_ids: [99] sample: true {GREEDY} }} seqs {{ seq_id: 3 num_computed_tokens: 2 num_scheduled_tokens: 1 }}",
            "step_id: 7 finished: [1]",
            "step_id: 2 seqs { seq_id: 4 new_token_ids: [0, 5] num_scheduled_tokens: -3 sample: true params { top_p: 2 } } kv_loads { block: -1 slot: 9 } copies { src: 40 dst: -2 }"),
        "empty_plan": plans("step_id: 1"),
    }
    for name, text in s.items():
        put("step_plan_fuzz", name, encode("lorcserve.fuzz.Plans", text, "step_plans.proto", extra))


if __name__ == "__main__":
    seeds_safetensors()
    seeds_config()
    seeds_generation_config()
    seeds_lorc()
    seeds_tokenizer_json()
    seeds_tokenizer_text()
    seeds_requests()
    seeds_steps()
    print("seeds written under", CORPUS, file=sys.stderr)

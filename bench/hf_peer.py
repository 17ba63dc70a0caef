#!/usr/bin/env python3
"""The peer of `lorcserve bench --model DIR`: Hugging Face transformers + PyTorch on the same
shapes, batches and contexts (random weights from the same config.json), printing the same JSON
fields (one object a line). bf16, SDPA attention, the static KV cache; decode through
torch.compile (generate's compiled static-cache path) unless --eager, falling back to eager for a
shape whose compiled run fails (the JSON line's "mode" says which ran).

Decode: for each (batch, context), `generate` with random prompts of `context` tokens, EOS
ignored (min_new_tokens = max_new_tokens); a streamer synchronises the device and stamps each
token; ms per step is the median interval after the first token. Compiled runs do one untimed
warm-up generate of the same shape first (compilation). Prefill: one prompt, max_new_tokens 1,
time to first token (median of --prefill-reps after a warm-up).

Floors as lorcserve's: (weights read per step + KV bytes) / --hbm-tbps, and prefill FLOPs
(2 * params * tokens + attention) against --gemm-peak-tflops; both default to the device's row in
common/device_ceilings.h (a device without one: no floor).

  python3 bench/hf_peer.py --model bench/configs/llama3-8b [--eager] [--ours ours.jsonl]
  python3 bench/hf_peer.py --model bench/configs/llama3-70b --devices 2   # does not fit one GPU

--devices N (N > 1) splits the model over N GPUs with a device_map (transformers' / accelerate's
pipeline split: consecutive layers per GPU, one GPU busy at a time), created on the meta device
and materialised on its GPU (to_empty), then initialised there (normal(0, initializer_range)
matrices, unit norms), so the host never holds the weights. torch.compile may fail across
devices; a shape whose compiled run fails runs eagerly ("mode" says which ran, "compile_error"
why). The config line's "floor_assumes" says what the floor means for the split.

--ours FILE (lorcserve bench's JSON lines) adds a table of both side by side.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time


def parse_list(s):
    return [int(x) for x in s.split(",") if x]


def split_over_devices(model, cfg, devices, torch):
    """Materialises a meta-device model over `devices` GPUs (consecutive layers per GPU; the
    embedding on the first, the final norm and LM head on the last), initialises it there, and
    dispatches it (accelerate's hooks move activations between GPUs)."""
    from accelerate import dispatch_model

    n = cfg.num_hidden_layers
    per = (n + devices - 1) // devices
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    for i in range(n):
        device_map[f"model.layers.{i}"] = i // per
    device_map["model.norm"] = devices - 1
    device_map["lm_head"] = devices - 1
    for name, dev in device_map.items():
        model.get_submodule(name).to_empty(device=f"cuda:{dev}")
    # to_empty leaves the RoPE frequencies (a computed buffer) uninitialised: rebuild it there.
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=cfg, device="cuda:0")
    std = getattr(cfg, "initializer_range", 0.02) or 0.02
    gen = {}
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.device not in gen:
                gen[p.device] = torch.Generator(device=p.device).manual_seed(p.device.index or 0)
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen[p.device])
            else:
                p.fill_(1.0)  # RMSNorm weights
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return dispatch_model(model, device_map=device_map)


def device_ceilings(device_name):
    """(decode floor TB/s: the faster of copy and weight read, GEMM peak TFLOP/s) of the first row
    of common/device_ceilings.h whose name the device's name contains (lorcserve bench's own
    lookup), or None."""
    header = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common", "device_ceilings.h")
    try:
        text = open(header).read()
    except OSError:
        return None
    for name, copy, peak, read in re.findall(r'\{"([^"]+)",\s*([0-9.]+),\s*([0-9.]+),\s*([0-9.]+),', text):
        if name in device_name:
            return max(float(copy), float(read)), float(peak)  # DeviceCeilings::decode_tbps()
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with config.json (weights unused)")
    ap.add_argument("--decode-batches", default="1,8,64,256")
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--prefill", default="512,4096")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument("--hbm-tbps", type=float, default=None,
                    help="decode floor's bandwidth, TB/s (default: the device's row in common/device_ceilings.h)")
    ap.add_argument("--gemm-peak-tflops", type=float, default=None,
                    help="prefill floor's peak, TFLOP/s (default: as --hbm-tbps)")
    ap.add_argument("--kv-budget-gb", type=float, default=100.0,
                    help="skip a shape whose static cache needs more (default 100)")
    ap.add_argument("--time-budget-s", type=float, default=0,
                    help="skip the shapes left once this much time has passed (0: no limit)")
    ap.add_argument("--devices", type=int, default=1,
                    help="split the model over N GPUs (device_map pipeline split; default 1)")
    ap.add_argument("--ours", help="lorcserve bench JSON lines to print next to these")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    t_start = time.perf_counter()
    row = device_ceilings(torch.cuda.get_device_name())
    if a.hbm_tbps is None and row:
        a.hbm_tbps = row[0]
    if a.gemm_peak_tflops is None and row:
        a.gemm_peak_tflops = row[1]
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.model)
    if a.devices < 1 or a.devices > torch.cuda.device_count():
        ap.error(f"--devices: {a.devices} is not in [1, {torch.cuda.device_count()}] (the GPUs present)")

    def sync():
        for d in range(a.devices):
            torch.cuda.synchronize(d)

    def make(device):
        with torch.device(device):
            try:
                return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
            except TypeError:  # older transformers: torch_dtype
                return AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16,
                                                        attn_implementation="sdpa")

    t0 = time.perf_counter()
    if a.devices == 1:
        model = make("cuda")
    else:
        model = split_over_devices(make("meta"), cfg, a.devices, torch)
    model.eval()
    sync()
    load_s = time.perf_counter() - t0
    embed = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - (0 if cfg.tie_word_embeddings else embed.numel())
    elem = 2
    weight_bytes = matmul_params * elem
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
    q_size = cfg.num_attention_heads * head_dim
    mode = "eager" if a.eager else "compile"
    if a.devices == 1:
        floor_assumes = "all weights but the embedding table + the KV of every sequence, over hbm_tbps"
    else:
        floor_assumes = (f"pipeline over {a.devices} GPUs, one busy at a time: all weights but the "
                         "embedding table + all KV, over one GPU's hbm_tbps")
    print(json.dumps({"kind": "config", "engine": "hf-transformers", "model": a.model,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "device": torch.cuda.get_device_name(), "params": params,
                      "weight_bytes_read": weight_bytes, "kv_bytes_per_token": kv_per_token,
                      "load_s": load_s, "mode": mode, "devices": a.devices,
                      "floor_assumes": floor_assumes, "hbm_tbps": a.hbm_tbps,
                      "gemm_peak_tflops": a.gemm_peak_tflops}), flush=True)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            sync()
            self.t.append(time.perf_counter())

        def end(self):
            pass

    gen = torch.Generator(device="cuda").manual_seed(1)

    def run(batch, context, new_tokens, compiled):
        ids = torch.randint(3, cfg.vocab_size, (batch, context), device="cuda", generator=gen)
        s = Stamps()
        sync()
        t = time.perf_counter()
        # generate compiles the static-cache decode step itself unless told not to.
        model.generation_config.disable_compile = not compiled
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                           streamer=s, pad_token_id=0)
        # s.t[0]: the prompt; s.t[1]: the first token; then one stamp per decode step.
        if len(s.t) == new_tokens:  # a generate that does not stream the prompt
            s.t.insert(0, t)
        return t, s.t

    def over_budget():
        return a.time_budget_s > 0 and time.perf_counter() - t_start > a.time_budget_s

    def attempt(batch, context, new_tokens, warm):
        """Runs (after a warm-up when `warm`), falling back to eager when compile fails."""
        modes = [False] if a.eager else [True, False]
        err = None
        for compiled in modes:
            try:
                if warm or compiled:
                    run(batch, context, new_tokens if compiled else 2, compiled)
                return run(batch, context, new_tokens, compiled), ("compile" if compiled else "eager"), err
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # compile failures: say so and run eager
                err = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.empty_cache()
        raise RuntimeError(err)

    rows = []
    for n in parse_list(a.prefill):
        j = {"kind": "prefill", "tokens": n}
        if over_budget():
            j["skipped"] = "time budget"
        else:
            try:
                ttft = []
                for i in range(a.prefill_reps + 1):
                    t, st = run(1, n, 1, False)
                    if i > 0:
                        ttft.append(st[1] - t)
                tt = statistics.median(ttft)
                flops = 2.0 * matmul_params * n + 2.0 * n * n * q_size * cfg.num_hidden_layers
                j.update({"mode": "eager", "ttft_ms": tt * 1e3, "tokens_per_s": n / tt,
                          "tflops": flops / tt * 1e-12,
                          })
                if a.gemm_peak_tflops:
                    j["pct_of_gemm_peak"] = 100.0 * flops / tt * 1e-12 / a.gemm_peak_tflops
            except Exception as e:
                j["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.empty_cache()
        print(json.dumps(j), flush=True)
        rows.append(j)

    for context in parse_list(a.contexts):
        for batch in parse_list(a.decode_batches):
            j = {"kind": "decode", "batch": batch, "context": context}
            need = kv_per_token * batch * (context + a.steps + 2)
            if need > a.kv_budget_gb * 1e9 or context + a.steps + 2 > cfg.max_position_embeddings:
                j["skipped"] = f"static cache {need / 1e9:.1f} GB or positions beyond the model's"
            elif over_budget():
                j["skipped"] = "time budget"
            else:
                try:
                    (t, st), m, err = attempt(batch, context, a.steps + 1, warm=False)
                    steps = [1e3 * (y - x) for x, y in zip(st[2:], st[3:])]
                    ms = statistics.median(steps)
                    kv_bytes = kv_per_token * batch * (context + a.steps / 2.0)
                    j.update({"mode": m, "ms_per_step": ms, "tokens_per_s": batch / (ms * 1e-3),
                              "fill_s": st[1] - t, "steps": len(steps)})
                    if a.hbm_tbps:
                        floor_ms = (weight_bytes + kv_bytes) / (a.hbm_tbps * 1e12) * 1e3
                        j.update({"floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / ms})
                    if err:
                        j["compile_error"] = err
                except Exception as e:
                    j["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.empty_cache()
            print(json.dumps(j), flush=True)
            rows.append(j)
    if a.ours:
        ours = {}
        with open(a.ours) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    o = json.loads(line)
                    ours[(o.get("kind"), o.get("batch"), o.get("context"), o.get("tokens"))] = o
        print(f"# {a.model} on {torch.cuda.get_device_name()}: lorcserve vs HF transformers "
              f"{transformers.__version__} (torch {torch.__version__})")
        for j in rows:
            if "skipped" in j or "error" in j:
                print(j)
                continue
            o = ours.get((j["kind"], j.get("batch"), j.get("context"), j.get("tokens")), {})
            if j["kind"] == "decode":
                fl = o.get("floor_ms", j.get("floor_ms", float("nan")))
                print("decode b=%-4d ctx=%-5d ours %8.3f ms (%5.1f%% of floor)  peer %8.3f ms %-7s  floor %7.3f ms"
                      % (j["batch"], j["context"], o.get("ms_per_step", float("nan")),
                         o.get("pct_of_floor", float("nan")), j.get("ms_per_step", float("nan")),
                         j.get("mode", "-"), fl))
            elif j["kind"] == "prefill":
                print("prefill %-5d ours %8.1f ms %6.1f TFLOP/s (%4.1f%%)  peer %8.1f ms %6.1f TFLOP/s (%4.1f%%)"
                      % (j["tokens"], o.get("ttft_ms", float("nan")), o.get("tflops", float("nan")),
                         o.get("pct_of_gemm_peak", float("nan")), j.get("ttft_ms", float("nan")),
                         j.get("tflops", float("nan")), j.get("pct_of_gemm_peak", float("nan"))))


if __name__ == "__main__":
    sys.exit(main())

"""An OpenAI request body -> the fields of one lorcserve.v1.GenerateRequest.

Every field a user sends is either mapped onto the request or rejected with 400 naming it;
nothing is ignored silently. `null` counts as absent (SDKs send it). Unset sampling fields take
the model's generation_config.json values (ModelInfo.generation_defaults, as vLLM does), else
OpenAI's defaults (OPENAI_DEFAULTS: temperature 1, top_p 1).
"""

import math
import re

from .errors import bad_request, clip

# The proto's int32 fields (n, top_k, min_tokens, priority, token ids, logit_bias keys): a value
# outside this range is a 400 naming the field, never a protobuf ValueError (a 500).
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")

# OpenAI's documented defaults for fields whose lorcserve default differs (the proto's
# temperature 0 means greedy; OpenAI's unset temperature samples at 1).
OPENAI_DEFAULTS = {"temperature": 1.0}

# Fields of both endpoints that map onto SamplingOptions / GenerateRequest. The last group is
# vLLM's extensions and lorcserve's (session_id, cache_salt, priority).
COMMON_FIELDS = {
    "model", "stream", "stream_options", "temperature", "top_p", "seed", "stop", "max_tokens",
    "n", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "include_stop_str_in_output", "allowed_token_ids",
    "session_id", "cache_salt", "priority",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
# POST /v1/sessions/close (CloseSession).
SESSION_CLOSE_FIELDS = {"session_id", "cache_salt"}
# vLLM's POST /tokenize (a prompt, or chat messages rendered by the template) and /detokenize.
TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens", "messages", "add_generation_prompt",
                   "chat_template_kwargs", "return_token_strs"}
DETOKENIZE_FIELDS = {"model", "tokens"}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt",
    "chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "store",
}


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get_int(body, name, lo=INT32_MIN, hi=INT32_MAX):
    """body[name] as an int in [lo, hi] (None: unbounded on that side; the default: the proto's
    int32), None when absent; 400 naming the field otherwise."""
    v = _get(body, name, is_int, "an integer")
    if v is None:
        return None
    _check_range(name, v, lo, hi)
    return v


def _check_range(name, v, lo, hi):
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            bounds = f"in [{lo}, {hi}]"
        else:
            bounds = f">= {lo}" if lo is not None else f"<= {hi}"
        raise bad_request(name, f"must be {bounds}, got {clip(str(v))}")


def _get(body, name, ok, what):
    v = body.get(name)
    if v is not None and not ok(v):
        raise bad_request(name, f"must be {what}, got {clip(repr(v))}")
    return v


def _is_finite_number(v):
    # An int is finite whatever its size (math.isfinite raised OverflowError past 1e308).
    return _is_number(v) and (is_int(v) or math.isfinite(v))


# The largest finite float32: SamplingOptions' numbers are proto `float`, and a larger double
# (1e308 is finite JSON) would reach the coordinator as inf.
FLOAT32_MAX = 3.4028234663852886e38


def _float32(name, v, what=""):
    """v (a finite number) as a float within float32's range; 400 naming `name` otherwise
    (a JSON integer of 400 digits is exact in Python but overflows float())."""
    if abs(v) > FLOAT32_MAX:
        raise bad_request(name, f"{what}must be within float32's range (|x| <= 3.4e38), got "
                                f"{clip(repr(v))}")
    return float(v)


def get_number(body, name):
    """body[name] as a float (finite, and within float32's range: JSON's 1e400 parses as inf,
    1e308 would become inf in the proto's float), None when absent; 400 naming the field."""
    v = _get(body, name, _is_finite_number, "a finite number")
    return None if v is None else _float32(name, v)


def get_bool(body, name):
    return _get(body, name, lambda v: isinstance(v, bool), "true or false")


def get_str(body, name):
    return _get(body, name, lambda v: isinstance(v, str), "a string")


def get_int_list(body, name, max_len=None):
    """body[name] as a list of int32 (None when absent); more than max_len items, or any that is
    not one, is a 400 naming the field (the length checked first)."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, list) and max_len is not None and len(v) > max_len:
        raise bad_request(name, f"{len(v)} ids, more than the vocabulary's {max_len} tokens")
    if not isinstance(v, list) or not all(is_int(x) for x in v):
        raise bad_request(name, "must be a list of integers")
    for i, x in enumerate(v):
        _check_range(f"{name}[{i}]", x, INT32_MIN, INT32_MAX)
    return v


def strip_nulls(body):
    return {k: v for k, v in body.items() if v is not None}


def check_fields(body, allowed):
    """400 for a field this gateway does not implement, or one that is set to what it cannot do
    (tools, response formats other than text, suffix, best_of > n, store)."""
    for name in sorted(body):
        if name not in allowed:
            raise bad_request(name, "not supported by lorcserve")
    if body.get("suffix") not in (None, ""):
        raise bad_request("suffix", "insertion (suffix) is not supported")
    if body.get("tools") not in (None, []):
        raise bad_request("tools", "tool calling is not supported")
    if body.get("tool_choice") not in (None, "none"):
        raise bad_request("tool_choice", "tool calling is not supported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("response_format", "only {\"type\": \"text\"} is supported")
    if body.get("store") not in (None, False):
        raise bad_request("store", "stored completions are not supported")
    best_of = get_int(body, "best_of", 1)
    if best_of is not None and best_of != (body.get("n") or 1):
        raise bad_request("best_of", "must equal n (no server-side best-of selection)")


def fill_sampling(s, body, defaults, max_tokens, max_model_len=None,
                  max_tokens_name="max_tokens", vocab_size=None):
    """Sets SamplingOptions `s` from the body's common fields. defaults: the model's
    generation defaults (ModelInfo.generation_defaults). max_tokens: the endpoint's value (or
    None: lorcserve's default), read from the field max_tokens_name; more than max_model_len
    (ModelInfo's, when given) can never fit and is a 400 naming that field. vocab_size
    (ModelInfo's, when given): `logit_bias` and `allowed_token_ids` with more entries than the
    vocabulary has tokens are a 400 before their entries are read."""
    def pick(name, value, model_default_field=None):
        if value is not None:
            return value
        if model_default_field and defaults is not None and defaults.HasField(model_default_field):
            return getattr(defaults, model_default_field)
        return OPENAI_DEFAULTS.get(name)

    temperature = pick("temperature", get_number(body, "temperature"), "temperature")
    if temperature is not None:
        if temperature < 0:
            raise bad_request("temperature", f"must be >= 0, got {temperature}")
        s.temperature = temperature
    top_p = pick("top_p", get_number(body, "top_p"), "top_p")
    if top_p is not None:
        s.top_p = top_p
    top_k = get_int(body, "top_k")
    if top_k is None and defaults is not None and defaults.HasField("top_k"):
        top_k = defaults.top_k
    if top_k is not None:
        s.top_k = 0 if top_k == -1 else top_k  # vLLM: -1 is off
    min_p = pick("min_p", get_number(body, "min_p"), "min_p")
    if min_p is not None:
        s.min_p = min_p
    rep = pick("repetition_penalty", get_number(body, "repetition_penalty"), "repetition_penalty")
    if rep is not None:
        s.repetition_penalty = rep
    for name in ("presence_penalty", "frequency_penalty"):
        v = get_number(body, name)
        if v is not None:
            setattr(s, name, v)
    seed = get_int(body, "seed", 0, 2**64 - 1)  # uint64
    if seed is not None:
        s.seed = seed
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad_request(max_tokens_name, f"must be >= 1, got {max_tokens}")
        if max_model_len and max_tokens > max_model_len:
            raise bad_request(max_tokens_name, f"{max_tokens} exceeds the model's maximum length "
                                               f"of {max_model_len} tokens (max_model_len)")
        s.max_tokens = min(max_tokens, 2**31 - 1)
    n = get_int(body, "n")
    if n is not None:
        s.n = n
    stop = body.get("stop")
    if stop == "":
        raise bad_request("stop", "stop strings must not be empty")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise bad_request("stop", "must be a string or a list of strings")
        for i, x in enumerate(stop):
            if not x:
                raise bad_request(f"stop[{i}]", "stop strings must not be empty")
        s.stop.extend(stop)
    ids = get_int_list(body, "stop_token_ids")
    if ids:
        s.stop_token_ids.extend(ids)
    ids = get_int_list(body, "allowed_token_ids", vocab_size or None)
    if ids:
        s.allowed_token_ids.extend(ids)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request("logit_bias", "must be an object of token id -> bias")
        if vocab_size and len(bias) > vocab_size:
            raise bad_request("logit_bias", f"{len(bias)} entries, more than the vocabulary's "
                                            f"{vocab_size} tokens")
        for k, v in bias.items():
            # Decimal digits only (Python's int() also takes " 5 " and "1_0").
            if not _TOKEN_ID_KEY.fullmatch(k) or not INT32_MIN <= int(k) <= INT32_MAX:
                raise bad_request("logit_bias", f"key {clip(repr(k))} is not a token id")
            tid = int(k)
            if not _is_finite_number(v):
                raise bad_request("logit_bias",
                                  f"bias of token {k} must be a finite number, got "
                                  f"{clip(repr(v))}")
            s.logit_bias[tid] = _float32("logit_bias", v, f"the bias of token {k} ")
    for name in ("ignore_eos", "include_stop_str_in_output"):
        v = get_bool(body, name)
        if v is not None:
            setattr(s, name, v)
    min_tokens = get_int(body, "min_tokens", 0)
    if min_tokens is not None:
        s.min_tokens = min_tokens
    get_str(body, "user")  # end-user id for the caller's own abuse tracking: typed, not used


def fill_request(req, body):
    """Sets the GenerateRequest's lorcserve extension fields (session_id, cache_salt,
    priority)."""
    for name in ("session_id", "cache_salt"):
        v = get_str(body, name)
        if v is not None:
            setattr(req, name, v)
    priority = get_int(body, "priority")
    if priority is not None:
        req.priority = priority


def stream_flags(body):
    """(stream, include_usage)."""
    stream = bool(get_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad_request("stream_options", "only allowed with stream: true")
        if not isinstance(opts, dict):
            raise bad_request("stream_options", "must be an object")
        for k in opts:
            if k != "include_usage":
                raise bad_request(f"stream_options.{k}", "not supported by lorcserve")
        include_usage = bool(get_bool(opts, "include_usage"))
    return stream, include_usage

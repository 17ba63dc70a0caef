"""The FastAPI app: OpenAI's /v1/models, /v1/completions, /v1/chat/completions and /health in
front of one coordinator's public gRPC API (gateway/README.md has the contract).

Every request becomes one gRPC call (Generate, or ModelInfo / Tokenize / health); the gateway
keeps no model state beyond what ModelInfo reports (name, length limit, generation defaults;
asked again after the channel to the coordinator left READY) and the chat template. Threads: one asyncio event loop (uvicorn) runs every handler
and every gRPC call (grpc.aio); gRPC's C core has its own I/O threads.
"""

import asyncio
import codecs
import collections
import hashlib
import hmac
import json
import os
import re
import sys
import time
import traceback
import uuid

import grpc
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import chat_template as chat_template_mod
from . import params
from .errors import OpenAIError, bad_request, clip, from_grpc
from .vocab import Vocab

HEALTH_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_TIMEOUT_S = 5  # /health's wait for the coordinator's answer (a hung one: 503)
# gRPC retries a lost coordinator connection with exponential backoff, by default up to 120 s:
# a gateway would answer 503 for up to two minutes after its coordinator came back.
CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 2000)]


class Options:
    """Gateway settings (the command-line flags, __main__.py)."""

    def __init__(self, coordinator, served_model_name=None, model_dir=None, chat_template=None,
                 auth_token_file=None, tls_ca=None, tls_server_name=None, tls_cert=None,
                 tls_key=None):
        self.coordinator = coordinator
        self.served_model_name = served_model_name
        self.model_dir = model_dir
        self.chat_template = chat_template
        self.auth_token_file = auth_token_file
        self.tls_ca = tls_ca
        self.tls_server_name = tls_server_name
        self.tls_cert = tls_cert
        self.tls_key = tls_key


def read_token_digests(path):
    """SHA-256 digests of the tokens in `path` (security/README.md's format: one a line,
    whitespace trimmed, blank and '#' lines skipped). Raises ValueError naming the flag."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"--auth-token-file {path}: {e.strerror}") from e
    tokens = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
    if not tokens:
        raise ValueError(f"--auth-token-file {path}: no token in the file")
    return [hashlib.sha256(t.encode()).digest() for t in tokens]


def _read_pem(flag, path, marker):
    """The file's bytes; ValueError naming the flag when unreadable or without `marker`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from e
    if marker not in data:
        raise ValueError(f"{flag} {path}: no PEM {'key' if 'KEY' in marker.decode() else 'certificate'}"
                         " in the file")
    return data


def _check_client_certificate(cert_path, chain, key_path, key):
    """ValueError naming the flag for a --tls-cert that is expired or not yet valid, and for a
    --tls-key that is not its key: gRPC would start and then fail every handshake with a
    message that names neither (security/tls.cc checks the same on the C++ side)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(chain)
    except ValueError as e:
        raise ValueError(f"--tls-cert {cert_path}: not a PEM certificate ({e})") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:  # TypeError: an encrypted key
        raise ValueError(f"--tls-key {key_path}: not an unencrypted PEM private key ({e})") \
            from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"--tls-key {key_path}: does not match the certificate in --tls-cert "
                         f"{cert_path}")
    now = datetime.datetime.utcnow()  # cryptography 38's not_valid_* are naive UTC
    if cert.not_valid_after < now:
        raise ValueError(f"--tls-cert {cert_path}: the certificate expired on "
                         f"{cert.not_valid_after} UTC (notAfter)")
    if cert.not_valid_before > now:
        raise ValueError(f"--tls-cert {cert_path}: the certificate is not valid before "
                         f"{cert.not_valid_before} UTC (notBefore; is this machine's clock "
                         "right?)")


# gRPC refuses metadata over 8 KiB by default with RESOURCE_EXHAUSTED, which would read as a 429
# (retried by SDKs): a longer Authorization header is a 401 here.
MAX_AUTHORIZATION_BYTES = 4096


def _is_metadata_value(value):
    return len(value) <= MAX_AUTHORIZATION_BYTES and all(" " <= c <= "~" for c in value)


def _parse_health(data):
    """HealthCheckResponse bytes -> status number (field 1, varint; 1 = SERVING)."""
    if len(data) >= 2 and data[0] == 0x08:
        return data[1]
    return 0


class _ModelState:
    """What the gateway learns once from ModelInfo (and the model directory)."""

    def __init__(self, name, info, template, vocab, has_model_dir=True, model_dir=None):
        self.name = name
        self.info = info
        self.template = template
        self.vocab = vocab
        self.has_model_dir = has_model_dir
        self.model_dir = model_dir


def _static_info(info):
    """What the gateway's snapshot of ModelInfo depends on (not its live counters): the model's
    path, its limits, the KV cache's size, stop ids and generation defaults."""
    return (info.model, info.max_model_len, info.vocab_size, info.max_request_bytes,
            info.block_size, info.kv_capacity_blocks,
            tuple(info.eos_token_ids), info.generation_defaults.SerializeToString())


def max_tokens_that_fit(prompt_len, n, info):
    """The largest max_tokens whose n completions of a prompt_len-token prompt fit in the whole
    KV cache together (ModelInfo's block_size and kv_capacity_blocks), as the coordinator's
    admission check counts them (coordinator/scheduler.cc, Scheduler::Add): the prompt's full
    blocks shared when n > 1, every other block each completion's own, prompt + max_tokens - 1
    tokens cached. < 1 when not even one token fits (the coordinator's error then says so); a
    large number when the info has no cache size."""
    bs, capacity = info.block_size, info.kv_capacity_blocks
    if bs <= 0 or capacity <= 0:
        return 2**31 - 1
    n = max(1, n)
    shared = prompt_len // bs if n > 1 else 0
    if capacity < shared:
        return 0
    blocks_each = shared + (capacity - shared) // n
    return blocks_each * bs - prompt_len + 1


def _credential_digest(metadata):
    """SHA-256 of the authorization metadata a request forwards (b"" for none)."""
    value = dict(metadata).get("authorization", "")
    return hashlib.sha256(value.encode()).digest()


# Without --auth-token-file the coordinator judges tokens: a credential (the Authorization
# header, or none) it accepted is trusted this long before ModelInfo asks it again, and at most
# this many are remembered (the oldest forgotten first).
VERIFIED_TTL_S = 60.0
MAX_VERIFIED = 4096


class Gateway:
    def __init__(self, options, pb2, pb2_grpc):
        self.options = options
        self.pb2 = pb2
        self.pb2_grpc = pb2_grpc
        self.digests = (read_token_digests(options.auth_token_file)
                        if options.auth_token_file else None)
        if options.model_dir is not None and not os.path.isdir(options.model_dir):
            # Else every logprob would name tokens by id and chat would lack the template.
            raise ValueError(f"--model-dir {options.model_dir}: not a directory")
        # Compile an override template now: a malformed one stops the start-up.
        self.template_override = (chat_template_mod.load(options.model_dir, options.chat_template)
                                  if options.chat_template else None)
        # Read and checked now: gRPC would only fail each connection later (every request 503).
        self.tls_roots = (_read_pem("--tls-ca", options.tls_ca, b"-----BEGIN CERTIFICATE-----")
                          if options.tls_ca else None)
        self.tls_client = None  # (key, chain) for a coordinator with --tls-client-ca
        if options.tls_cert:
            self.tls_client = (_read_pem("--tls-key", options.tls_key, b"PRIVATE KEY-----"),
                               _read_pem("--tls-cert", options.tls_cert,
                                         b"-----BEGIN CERTIFICATE-----"))
            _check_client_certificate(options.tls_cert, self.tls_client[1], options.tls_key,
                                      self.tls_client[0])
        self.channel = None
        self.stub = None
        self.state = None
        self.state_lock = None
        # True once the channel left READY (the coordinator stopped, restarted or dropped the
        # connection) since `state` was learnt: the next request asks ModelInfo again.
        self.stale = False
        self.watch = None  # the asyncio task of _watch_channel
        self.verified = collections.OrderedDict()  # SHA-256 of a credential -> expiry (monotonic)
        self.closing = None  # set (asyncio.Event) when the drain ends the requests in flight
        self.closing_reason = None
        self.created = int(time.time())

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self):
        o = self.options
        if self.tls_roots is not None:
            key, chain = self.tls_client or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_roots,
                                                 private_key=key, certificate_chain=chain)
            opts = [("grpc.ssl_target_name_override", o.tls_server_name)] if o.tls_server_name \
                else []
            self.channel = grpc.aio.secure_channel(o.coordinator, creds,
                                                   options=CHANNEL_OPTIONS + opts)
        else:
            self.channel = grpc.aio.insecure_channel(o.coordinator, options=CHANNEL_OPTIONS)
        self.stub = self.pb2_grpc.LorcServeStub(self.channel)
        self.health = self.channel.unary_unary(HEALTH_METHOD, request_serializer=None,
                                               response_deserializer=None)
        self.state_lock = asyncio.Lock()
        self.closing = asyncio.Event()
        self.watch = asyncio.ensure_future(self._watch_channel())

    async def _watch_channel(self):
        """Marks the ModelInfo snapshot stale each time the channel leaves READY: a coordinator
        that comes back on the same address may serve another model or configuration."""
        state = self.channel.get_state()
        while True:
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state()
            if state != grpc.ChannelConnectivity.READY:
                self.stale = True

    def end_requests(self, why):
        """The drain's end (its timeout, or a second signal): every request in flight answers
        503 `why` now (a stream: an error event, then [DONE]) and its gRPC calls are cancelled.
        Called on the event loop's thread."""
        if self.closing is not None and not self.closing.is_set():
            self.closing_reason = why
            self.closing.set()

    def closing_error(self):
        return OpenAIError(503, f"gateway shutting down: {self.closing_reason}",
                           type_="service_unavailable_error")

    async def stop(self):
        if self.watch is not None:
            self.watch.cancel()
        if self.channel is not None:
            await self.channel.close()

    # -- auth ------------------------------------------------------------------------------
    def metadata(self, request, check=True):
        """Checks the bearer token when --auth-token-file is set (401 otherwise; not with
        check=False: /health, like the coordinator's default --auth-exempt health) and returns
        the gRPC metadata that forwards the caller's token to the coordinator."""
        header = request.headers.get("authorization")
        if header is not None and not _is_metadata_value(header):
            # gRPC metadata is printable ASCII: such a header (no token of ours is) would make
            # the call fail inside gRPC, and grpc.aio then never ends it (the request hangs).
            if not check:
                return ()
            raise OpenAIError(401, "the Authorization header must be printable ASCII of at "
                                   f"most {MAX_AUTHORIZATION_BYTES} bytes",
                              type_="authentication_error", code="invalid_api_key")
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():  # RFC 7235: the scheme in any case
            header = f"Bearer {token.strip()}"
        if self.digests is not None and check:
            if scheme.lower() != "bearer" or not token.strip():
                raise OpenAIError(401, "missing 'Authorization: Bearer <token>' header",
                                  type_="authentication_error", code="invalid_api_key")
            digest = hashlib.sha256(token.strip().encode()).digest()
            ok = False
            for d in self.digests:  # every digest compared: no early exit
                ok |= hmac.compare_digest(d, digest)
            if not ok:
                raise OpenAIError(401, "invalid bearer token", type_="authentication_error",
                                  code="invalid_api_key")
        return (("authorization", header),) if header else ()

    # -- model -----------------------------------------------------------------------------
    def _trusted(self, metadata):
        """Whether this request's credential needs no ModelInfo call: the gateway checked the
        token itself, or the coordinator accepted this credential within VERIFIED_TTL_S."""
        if self.digests is not None:
            return True
        expiry = self.verified.get(_credential_digest(metadata))
        return expiry is not None and expiry > time.monotonic()

    def _remember(self, metadata):
        key = _credential_digest(metadata)
        self.verified[key] = time.monotonic() + VERIFIED_TTL_S
        self.verified.move_to_end(key)
        while len(self.verified) > MAX_VERIFIED:
            self.verified.popitem(last=False)

    async def model_state(self, metadata):
        """The served model (ModelInfo, the chat template and vocabulary of its directory), for
        a caller the coordinator accepts: without --auth-token-file, a credential it has not
        accepted lately is sent to ModelInfo first, so that what the gateway knows (the model's
        name, its path, a request's validation) never answers a caller the coordinator would
        refuse (401). ModelInfo is asked again after the channel left READY (`stale`), and the
        snapshot replaced when what it depends on changed (_static_info). A snapshot of a
        coordinator that is not serving (loading or recovering: no KV cache size yet) is asked
        again on the next request (a tester found the loading one's kv_capacity_blocks 0 kept
        after the coordinator served, and every chat request without max_tokens refused). Errors
        map as every gRPC error."""
        if self.state is not None and not self.stale and self._trusted(metadata):
            return self.state
        stale, self.stale = self.stale, False  # a drop during the call sets it again
        try:
            info = await self.stub.ModelInfo(self.pb2.ModelInfoRequest(), metadata=metadata)
        except grpc.aio.AioRpcError as e:
            self.stale = self.stale or stale
            raise from_grpc(e) from None
        if self.digests is None:
            self._remember(metadata)
        if not info.serving:
            self.stale = True
        async with self.state_lock:
            if self.state is None or _static_info(self.state.info) != _static_info(info):
                # Reads the model's JSON files (tokenizer.json: megabytes): off the loop.
                self.state = await asyncio.to_thread(self._load_state, info)
            return self.state

    def _load_state(self, info):
        name = self.options.served_model_name or os.path.basename(
            info.model.rstrip("/")) or info.model
        model_dir = self.options.model_dir or info.model
        template = self.template_override
        vocab = None
        if os.path.isdir(model_dir):
            # The model's template, or the override with the model's special tokens.
            template = chat_template_mod.load(model_dir, self.options.chat_template)
            tok = os.path.join(model_dir, "tokenizer.json")
            if os.path.exists(tok):
                vocab = Vocab.from_tokenizer_json(tok)
            else:
                print(f"lorcserve-gateway: warning: no tokenizer.json in {model_dir}: logprobs "
                      "name tokens by id (token_id:N)", file=sys.stderr, flush=True)
        else:
            print(f"lorcserve-gateway: warning: the model directory {model_dir!r} (from the "
                  "coordinator's ModelInfo) is not a directory here: logprobs name tokens by id "
                  "(token_id:N) and chat needs --chat-template; mount the model at that path or "
                  "pass --model-dir", file=sys.stderr, flush=True)
        return _ModelState(name, info, template, vocab or Vocab({}), os.path.isdir(model_dir),
                           model_dir)

    @staticmethod
    def check_model(body, state):
        """The body's `model` against the served name (`state`: model_state's): 400 when absent
        or not a string, 404 model_not_found for another."""
        model = body.get("model")
        if model is None:
            raise bad_request("model", "required")
        if not isinstance(model, str):
            raise bad_request("model", f"must be a string, got {clip(repr(model))}")
        if model != state.name:
            raise OpenAIError(404, f"The model `{clip(model)}` does not exist (this server serves "
                                   f"`{state.name}`)", param="model", code="model_not_found")
        return state


# Request bodies: at most this many bytes (413 beyond: a batch of 64 prompts of 128k token ids
# is about 57 MB) and this many levels of nesting (OpenAI's bodies use fewer than 10).
MAX_REQUEST_BODY_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


async def _read_body(request):
    """The request's bytes; 413 past MAX_REQUEST_BODY_BYTES (checked as they arrive, so an
    oversized body is never held whole)."""
    too_large = OpenAIError(413, f"request body exceeds {MAX_REQUEST_BODY_BYTES} bytes",
                            code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def _check_json_value(body):
    """400 for nesting deeper than MAX_JSON_DEPTH and for a string that is not valid Unicode
    (a lone UTF-16 surrogate such as "\\ud800", which JSON's escapes allow): it names where."""
    stack = [(body, "", 1)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OpenAIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                # The path may hold a key with a surrogate itself: escaped for the answer.
                where = (path or "body").encode("utf-8", "backslashreplace").decode()
                raise bad_request(where, f"invalid Unicode: lone surrogate "
                                         f"U+{ord(v[e.start]):04X} at character "
                                         f"{e.start}") from None
        elif isinstance(v, dict):
            for k, x in v.items():
                name = f"{path}.{k}" if path else k
                stack.append((k, name, depth + 1))
                stack.append((x, name, depth + 1))
        elif isinstance(v, list):
            # Numbers need no check: a batch of token ids holds millions of them.
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)
                         if isinstance(x, (str, dict, list)))


# Bodies over this many bytes are parsed and checked on a worker thread: a 63 MB batch of token
# ids held the event loop (every other client, /health and running streams) for 23 s.
PARSE_OFF_LOOP_BYTES = 1 << 20


async def _read_json(request):
    raw = await _read_body(request)
    if len(raw) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


def _parse_json(raw):
    """The body as a dict (nulls dropped); 400 for what is not a JSON object of valid values."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # no NaN / Infinity
    except ValueError as e:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise OpenAIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    _check_json_value(body)
    return params.strip_nulls(body)


async def _next(call):
    msg = await call.read()
    return None if msg is grpc.aio.EOF else msg


_FINISH = {1: "length", 2: "stop", 3: "abort"}


class _Choice:
    """One completion's accumulated output (non-streaming) and its final fields."""

    def __init__(self):
        self.text = []
        self.token_ids = []
        self.logprobs = []
        self.finish_reason = None
        self.stop_reason = None


def _stop_reason(msg, stop_ids):
    """vLLM's stop_reason: the matched stop string, or the stop token id when it is one of
    `stop_ids` (the request's stop_token_ids); None for an EOS."""
    which = msg.WhichOneof("stop_reason")
    if which == "stop_token_id":
        return msg.stop_token_id if msg.stop_token_id in stop_ids else None
    return getattr(msg, which) if which else None


def _reported_stop_ids(sampling, info):
    """The stop token ids a response names in stop_reason: the request's stop_token_ids, less
    the model's EOS ids unless ignore_eos (vLLM checks EOS first and reports it as null)."""
    eos = () if sampling.ignore_eos else info.eos_token_ids
    return frozenset(sampling.stop_token_ids).difference(eos)


class _Usage:
    """Usage over a request's prompts (each counted once, whatever its n) and completions."""

    def __init__(self):
        self.prompts = {}  # prompt index -> (prompt_tokens, cached_prompt_tokens)
        self.completion_tokens = 0

    def add(self, prompt_index, msg, generated=True):
        """msg: a completion's final message; generated false: its tokens are not in the
        response (echo with max_tokens 0) and count none."""
        self.prompts.setdefault(prompt_index, (msg.usage.prompt_tokens,
                                               msg.usage.cached_prompt_tokens))
        if generated:
            self.completion_tokens += msg.usage.completion_tokens

    def body(self):
        p = sum(t for t, _ in self.prompts.values())
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens,
                "prompt_tokens_details": {
                    "cached_tokens": sum(c for _, c in self.prompts.values())}}


# -- logprobs in OpenAI's two shapes -------------------------------------------------------------
class _TextOffsets:
    """One completion's text_offset: the characters its tokens' bytes decode to so far (a
    character split over several tokens counts once, at its first), never past the length of
    the text the completion has produced (an EOS or stop token adds no text)."""

    def __init__(self, start=0):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = start

    def next(self, token_bytes, text_len):
        offset = min(self.chars, text_len)
        self.chars += len(self.decoder.decode(token_bytes))
        return offset


def _completion_entry(out, vocab, tid, lp, offsets, text_len, width_bytes=None):
    """Appends token `tid` to a legacy-completions `logprobs` object `out`: its name, its
    TokenLogprobs `lp` (None: null logprob and top, an echoed prompt's first token) and its
    text_offset (width_bytes: the bytes it adds to the text, its own by default)."""
    name = vocab.token_name(tid)
    out["tokens"].append(name)
    if lp is None:
        out["token_logprobs"].append(None)
        out["top_logprobs"].append(None)
    else:
        out["token_logprobs"].append(lp.logprob)
        top = {vocab.token_name(t.id): t.logprob for t in lp.top}
        top[name] = lp.logprob  # the token's own, whether it is in the top or not
        out["top_logprobs"].append(top)
    out["text_offset"].append(offsets.next(
        vocab.token_bytes(tid) if width_bytes is None else width_bytes, text_len))


def _completion_logprobs(vocab, ids, lps, offsets, text_len):
    """Legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. Tokens are
    named by Vocab.token_name (`bytes:\\xNN` for part of a character). offsets: the
    completion's _TextOffsets; text_len: the length of its text up to these tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp in zip(ids, lps):
        _completion_entry(out, vocab, tid, lp, offsets, text_len)
    return out


def _echo_logprobs(vocab, echo, lps, offsets, text_len):
    """The echoed prompt's part of a completion's `logprobs` (vLLM's echo): every prompt token,
    the first with null logprob and top_logprobs (it has no context), the others with the
    prompt's TokenLogprobs `lps` (positions 1 on). A first token the echoed text does not start
    with (the BOS the coordinator adds to a text prompt) adds no characters: its offset and the
    next token's are 0."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for pos, tid in enumerate(echo.ids):
        lp = lps[pos - 1] if 0 < pos <= len(lps) else None
        hidden = pos == 0 and echo.hidden_first
        _completion_entry(out, vocab, tid, lp, offsets, text_len, b"" if hidden else None)
    return out


def _joined_logprobs(first, second):
    """Two legacy-completions `logprobs` objects one after the other (the echoed prompt's, then
    the generated tokens')."""
    if first is None or second is None:
        return first if second is None else second
    return {k: first[k] + second[k] for k in first}


class _Echo:
    """A completions prompt as echoed: its text (a text prompt as sent; a token-id prompt's
    tokens decoded) and, when the response has logprobs, its token ids as the coordinator
    sees them (hidden_first: the first is not in the text, e.g. the BOS a text prompt gets)."""

    def __init__(self, text, ids):
        self.text = text
        self.ids = ids or []
        self.hidden_first = False

    def set_ids(self, ids, vocab):
        """The prompt's ids as the coordinator sees them. A text that its tokens do not spell
        (after a first token the coordinator added, e.g. its BOS) is replaced by their text: the
        one-BOS rule drops a repeated BOS, a tokenizer may normalize; the offsets follow the
        tokens."""
        self.ids = list(ids)
        self.hidden_first = False
        if not self.ids or vocab.empty:
            return self
        spelled = b"".join(vocab.token_bytes(t) for t in self.ids)
        text = self.text.encode("utf-8", errors="surrogatepass")
        if spelled != text:
            if spelled[len(vocab.token_bytes(self.ids[0])):] == text:
                self.hidden_first = True
            else:
                self.text = vocab.decode(self.ids)
        return self


async def _tokenize(gateway, text, add_special_tokens, metadata):
    """The coordinator's Tokenize of `text` (add_special_tokens true: the ids a Generate call of
    that text sees); its errors as OpenAIError."""
    try:
        return list((await gateway.stub.Tokenize(
            gateway.pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=metadata)).ids)
    except grpc.aio.AioRpcError as e:
        raise from_grpc(e) from None


async def _echo_of(gateway, state, metadata, prompt, param, with_ids):
    """The _Echo of one completions prompt (param: its field name, for errors). A text prompt
    with logprobs is tokenized by the coordinator (Tokenize with add_special_tokens: the ids its
    Generate call will see); a token-id prompt's text needs the model's vocabulary."""
    vocab = state.vocab
    if isinstance(prompt, str):
        echo = _Echo(prompt, None)
        if with_ids:
            echo.set_ids(await _tokenize(gateway, prompt, True, metadata), vocab)
        return echo
    if vocab.empty:
        raise bad_request("echo", f"echoing the token-id {param} needs its text: the gateway has "
                                  "no tokenizer.json (start it with --model-dir DIR)")
    return _Echo(vocab.decode(prompt), None).set_ids(prompt, vocab)


def _chat_logprobs(vocab, ids, lps, top_n):
    content = []
    for tid, lp in zip(ids, lps):
        b = vocab.token_bytes(tid)
        content.append({
            "token": vocab.token_text(tid), "logprob": lp.logprob, "bytes": list(b),
            "top_logprobs": [{"token": vocab.token_text(t.id), "logprob": t.logprob,
                              "bytes": list(vocab.token_bytes(t.id))} for t in lp.top[:top_n]],
        })
    return {"content": content}


class _Endpoint:
    """What differs between /v1/completions and /v1/chat/completions, and a request's
    response-wide settings. max_tokens_name: the field the request's max_tokens came from (None
    when it sent none: chat's gateway-chosen default, completions' 16); stop_ids:
    _reported_stop_ids."""

    def __init__(self, chat, rid, model, vocab, top_n, stop_ids, max_tokens_name="max_tokens",
                 echoes=None, echo_only=False, n=1):
        self.chat = chat
        self.echoes = echoes  # completions' echo: an _Echo per prompt; None without echo
        self.echo_only = echo_only  # echo with max_tokens 0: the generated token is left out
        self.n = n
        self.id = rid
        self.model = model
        self.vocab = vocab
        self.top_n = top_n  # None: no logprobs
        self.stop_ids = stop_ids
        self.max_tokens_name = max_tokens_name
        self.created = int(time.time())
        self.offsets = collections.defaultdict(_TextOffsets)  # choice index -> its text_offset
        self.text_len = collections.Counter()  # choice index -> characters of text so far

    def logprobs(self, index, ids, lps, text):
        """The `logprobs` of choice `index`'s tokens `ids` (whose text is `text`); None without
        logprobs."""
        self.text_len[index] += len(text)
        if self.top_n is None:
            return None
        if self.chat:
            return _chat_logprobs(self.vocab, ids, lps, self.top_n)
        return _completion_logprobs(self.vocab, ids, lps, self.offsets[index],
                                    self.text_len[index])

    def echo(self, index, prompt_lps):
        """Choice `index`'s echoed prompt, which comes before its generated text: (text,
        logprobs or None). prompt_lps: the prompt's TokenLogprobs (GenerateResponse's
        prompt_logprobs, positions 1 on)."""
        e = self.echoes[index // self.n]
        self.text_len[index] += len(e.text)
        lp = None if self.top_n is None else _echo_logprobs(
            self.vocab, e, prompt_lps, _TextOffsets(), self.text_len[index])
        # The generated text is decoded on its own (the coordinator's), after the echoed text:
        # its offsets count from there, even when the prompt ended inside a character.
        self.offsets[index] = _TextOffsets(start=len(e.text))
        return e.text, lp

    def envelope(self, choices, chunk):
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def choice(self, index, text, logprobs, finish_reason, stop_reason, chunk, first=False):
        c = {"index": index}
        if self.chat:
            if chunk:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                if finish_reason is not None and not text and not first:
                    delta = {}
                c["delta"] = delta
            else:
                c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        c["logprobs"] = logprobs
        c["finish_reason"] = finish_reason
        c["stop_reason"] = stop_reason
        return c


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(gateway):
    app = FastAPI(title="lorcserve OpenAI-compatible gateway")

    @app.on_event("startup")
    async def _start():
        await gateway.start()

    @app.on_event("shutdown")
    async def _stop():
        await gateway.stop()

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request, exc):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc):
        # A bug of the gateway: still OpenAI's shape (the traceback goes to stderr).
        traceback.print_exception(exc)
        return OpenAIError(500, f"internal gateway error: {type(exc).__name__}: {exc}",
                           type_="internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        # Routing's own answers (no such path 404, wrong method 405) in OpenAI's shape too.
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = OpenAIError(exc.status_code, str(exc.detail), type_=type_)
        return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)  # Allow

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_request, _exc):
        # The client hung up while sending its body: nobody reads an answer, nothing to log.
        return Response(status_code=499)

    @app.exception_handler(chat_template_mod.ChatTemplateError)
    async def _template_error(_request, exc):
        return OpenAIError(400, f"messages: the chat template failed: {exc}",
                           param="messages").response()

    @app.get("/health")
    async def health(request: Request):
        """200 while the coordinator answers SERVING within HEALTH_TIMEOUT_S, else 503 (what
        probes take for not ready), whatever the gRPC error: a hung coordinator's
        DEADLINE_EXCEEDED too."""
        try:
            data = await gateway.health(b"", metadata=gateway.metadata(request, check=False),
                                        timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            err = from_grpc(e)
            return OpenAIError(503, f"the coordinator is not serving: {err.message}",
                               type_="service_unavailable_error").response()
        if _parse_health(data) != 1:
            return OpenAIError(503, "the coordinator is not serving (health NOT_SERVING)",
                               type_="service_unavailable_error").response()
        return JSONResponse({"status": "ok"})

    def model_card(state):
        return {"id": state.name, "object": "model", "created": gateway.created,
                "owned_by": "lorcserve", "root": state.info.model,
                "max_model_len": state.info.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request):
        state = await gateway.model_state(gateway.metadata(request))
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):  # the SDKs' models.retrieve
        state = await gateway.model_state(gateway.metadata(request))
        return model_card(gateway.check_model({"model": model}, state))

    async def _begin(request, fields, model=True):
        """Token check (the gateway's own, or the coordinator's through ModelInfo), then the
        body, field check, model (unless `model` is false: a body without one): (metadata,
        body, model state). A caller without a valid token gets its 401 before the body is
        read: parsing a large one costs the event loop."""
        metadata = gateway.metadata(request)
        state = await gateway.model_state(metadata)
        body = await _read_json(request)
        params.check_fields(body, fields)
        return metadata, body, gateway.check_model(body, state) if model else state

    @app.post("/v1/completions")
    async def completions(request: Request):
        metadata, body, state = await _begin(request, params.COMPLETION_FIELDS)
        req = gateway.pb2.GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}")
        prompts = _prompts(body.get("prompt"), state.info.max_model_len)
        echo = bool(params.get_bool(body, "echo"))
        top_n = params.get_int(body, "logprobs", 0, 20)
        if top_n is not None:
            req.sampling.logprobs = top_n
            if echo:  # the echoed prompt's tokens carry theirs (position 0: null)
                req.sampling.prompt_logprobs = top_n
        max_tokens = params.get_int(body, "max_tokens", 0 if echo else 1, None)
        # echo with max_tokens 0 (vLLM's): the prompt alone. The coordinator generates one token
        # (its minimum), which the response leaves out.
        echo_only = echo and max_tokens == 0
        params.fill_sampling(req.sampling, body, state.info.generation_defaults,
                             1 if echo_only else max_tokens,
                             state.info.max_model_len, vocab_size=state.info.vocab_size)
        params.fill_request(req, body)
        reqs = []
        for i, prompt in enumerate(prompts):  # one Generate per prompt of a batch
            r = gateway.pb2.GenerateRequest()
            r.CopyFrom(req)
            if len(prompts) > 1:
                r.request_id = f"{req.request_id}-{i}"
            if isinstance(prompt, str):
                r.text = prompt
            else:
                r.token_ids.ids.extend(prompt)
            _check_size(r, state, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
            reqs.append(r)
        echoes = None
        if echo:
            echoes = await asyncio.gather(*(
                _echo_of(gateway, state, metadata, p,
                         f"prompt[{i}]" if len(prompts) > 1 else "prompt", top_n is not None)
                for i, p in enumerate(prompts)))
        ep = _Endpoint(False, req.request_id, state.name, state.vocab, top_n,
                       _reported_stop_ids(req.sampling, state.info),
                       "max_tokens" if req.sampling.HasField("max_tokens") else None,
                       echoes=echoes, echo_only=echo_only,
                       n=req.sampling.n if req.sampling.HasField("n") else 1)
        return await _run(request, body, reqs, ep, metadata)

    @app.post("/v1/sessions/close")
    async def close_session(request: Request):
        """lorcserve's extension: ends a multi-turn session now (the CloseSession RPC; body
        {"session_id", "cache_salt"}, the salt its turns carried): its pinned KV blocks become
        ordinary cached ones. 200 {"id", "object": "session", "closed": true}; 404 when there is
        no such session (never started, or already ended); 400 naming a bad field. The token is
        checked before the body is read, as for the other endpoints."""
        metadata, body, _ = await _begin(request, params.SESSION_CLOSE_FIELDS, model=False)
        session_id = params.get_str(body, "session_id")
        if not session_id:
            raise bad_request("session_id", "required: the session to close")
        req = gateway.pb2.CloseSessionRequest(session_id=session_id,
                                              cache_salt=params.get_str(body, "cache_salt") or "")
        try:
            await gateway.stub.CloseSession(req, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            err = from_grpc(e)
            if err.status == 404:
                err = OpenAIError(404, f"session_id {clip(repr(session_id))}: no such session for "
                                       "this cache_salt (never started, or already ended: closed, "
                                       "idle past the ttl, or released for memory)",
                                  type_=err.type, param="session_id")
            elif err.status == 400 and err.param is None:
                err.param = "cache_salt" if err.message.startswith("cache_salt") else "session_id"
            raise err from None
        return {"id": session_id, "object": "session", "closed": True}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: {"prompt"} or chat {"messages"} (rendered as /v1/chat/completions renders
        them; "model" optional) -> {"count", "max_model_len", "tokens", "token_strs"}. add_special_tokens (default
        true) as TokenizeRequest's: true gives exactly the ids a Generate call of that text
        sees (one BOS); return_token_strs adds each token's text."""
        metadata, body, state = await _begin(request, params.TOKENIZE_FIELDS, model=False)
        if "model" in body:  # optional here, as vLLM's
            gateway.check_model(body, state)
        if ("prompt" in body) == ("messages" in body):
            raise bad_request("prompt", "exactly one of prompt (a string) or messages is required")
        if "messages" in body:
            text = _render_chat(state, body)
        else:
            text = params.get_str(body, "prompt")
        add_special = params.get_bool(body, "add_special_tokens")
        limit = state.info.max_request_bytes
        if limit > 0 and len(text.encode("utf-8", errors="surrogatepass")) > limit:
            param = "messages" if "messages" in body else "prompt"
            raise OpenAIError(413, f"{param}: the text is over the coordinator's limit of {limit} "
                                   "bytes per request", param=param, code="request_too_large")
        ids = await _tokenize(gateway, text, add_special is not False, metadata)
        strs = [state.vocab.token_piece(t) for t in ids] \
            if params.get_bool(body, "return_token_strs") else None
        return {"count": len(ids), "max_model_len": state.info.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's: {"tokens": [ids]} -> {"prompt": their text} (special tokens spelled out; bytes
        that are not whole UTF-8 read U+FFFD). Needs the model's tokenizer.json (400 naming
        tokens otherwise); ids outside the vocabulary are a 400 naming the first."""
        _, body, state = await _begin(request, params.DETOKENIZE_FIELDS, model=False)
        if "model" in body:
            gateway.check_model(body, state)
        tokens = body.get("tokens")
        if isinstance(tokens, list) and len(tokens) > MAX_DETOKENIZE_IDS:
            raise bad_request("tokens", f"{len(tokens)} ids, more than the {MAX_DETOKENIZE_IDS} "
                                        "one call decodes")
        ids = params.get_int_list(body, "tokens")
        if ids is None:
            raise bad_request("tokens", "required: a list of token ids")
        for i, t in enumerate(ids):
            if not 0 <= t < state.info.vocab_size:
                raise bad_request(f"tokens[{i}]", f"token id {t} is outside the vocabulary "
                                                  f"[0, {state.info.vocab_size})")
        if state.vocab.empty:
            raise bad_request("tokens", "the gateway has no tokenizer.json to read them with "
                                        "(start it with --model-dir DIR)")
        if len(ids) <= 65536:
            return {"prompt": state.vocab.decode(ids)}
        # Off the event loop: a million ids take a second or more (a tester held /health 8 s).
        text = await asyncio.to_thread(state.vocab.decode, ids)
        return Response(await asyncio.to_thread(_dumps, {"prompt": text}),
                        media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        metadata, body, state = await _begin(request, params.CHAT_FIELDS)
        text = _render_chat(state, body)
        req = gateway.pb2.GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", text=text)
        _check_size(req, state, "messages")
        want_logprobs = params.get_bool(body, "logprobs")
        top_n = params.get_int(body, "top_logprobs", 0, 20)
        if top_n is not None and not want_logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")
        if want_logprobs:
            top_n = top_n or 0
            req.sampling.logprobs = top_n
        else:
            top_n = None
        max_tokens = params.get_int(body, "max_tokens", 1, None)  # checked even when unused
        max_tokens_name = "max_tokens"
        max_completion_tokens = params.get_int(body, "max_completion_tokens", 1, None)
        if max_completion_tokens is not None:
            max_tokens = max_completion_tokens
            max_tokens_name = "max_completion_tokens"
        sent_max_tokens = max_tokens is not None
        if max_tokens is None:
            # OpenAI's chat default: until the model stops, within the model length. The prompt's
            # ids as Generate will see them (add_special_tokens: BOS counted once, whether the
            # template spells it or the coordinator adds it).
            ids = await _tokenize(gateway, text, True, metadata)
            max_tokens = state.info.max_model_len - len(ids)
            if max_tokens < 1:
                raise bad_request("messages", f"the prompt ({len(ids)} tokens) leaves no "
                                              f"room in max_model_len {state.info.max_model_len}")
            # ... and within what the whole KV cache holds for the n completions: the
            # coordinator refuses a request whose worst case can never fit, which a cache smaller
            # than n x max_model_len made of every chat request without max_tokens. When not even
            # one token fits, 1: the coordinator then refuses it with the real shortfall (or
            # first refuses an n out of range), named `messages` (_prompt_error).
            fit = max_tokens_that_fit(len(ids), params.get_int(body, "n") or 1, state.info)
            max_tokens = max(1, min(max_tokens, fit))
        params.fill_sampling(req.sampling, body, state.info.generation_defaults, max_tokens,
                             state.info.max_model_len, max_tokens_name, state.info.vocab_size)
        params.fill_request(req, body)
        ep = _Endpoint(True, req.request_id, state.name, state.vocab, top_n,
                       _reported_stop_ids(req.sampling, state.info),
                       max_tokens_name if sent_max_tokens else None)
        return await _run(request, body, [req], ep, metadata)

    async def _run(request, body, reqs, ep, metadata):
        """One Generate call per request (the prompts of a batch), answered together. A client
        that disconnects cancels the calls, also while they wait for their first token (queued
        or in prefill)."""
        stream, include_usage = params.stream_flags(body)
        if not stream:
            _check_response_size(reqs, ep)
        calls = [gateway.stub.Generate(r, metadata=metadata) for r in reqs]
        watch = asyncio.ensure_future(_watch_disconnect(request))
        closing = asyncio.ensure_future(gateway.closing.wait())  # the drain's end
        try:
            # Errors before any output answer with their status.
            firsts = asyncio.ensure_future(asyncio.gather(*(_first(c, i)
                                                            for i, c in enumerate(calls))))
            await asyncio.wait({firsts, watch, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not firsts.done():  # the client went away, or the drain ended, first
                _cancel(calls)
                firsts.cancel()
                firsts.add_done_callback(_consume)
                if closing.done():
                    raise gateway.closing_error()
                return Response(status_code=499)  # nobody reads it (nginx's "client closed")
            firsts = firsts.result()
        except _PromptError as e:
            watch.cancel()
            closing.cancel()
            _cancel(calls)
            raise _prompt_error(from_grpc(e.error), e.index, len(calls), ep.chat,
                                ep.max_tokens_name) from None
        except BaseException:
            watch.cancel()
            closing.cancel()
            _cancel(calls)
            raise
        n = reqs[0].sampling.n if reqs[0].sampling.HasField("n") else 1
        if stream:
            watch.cancel()  # Starlette's StreamingResponse listens for the disconnect itself
            closing.cancel()  # _merged watches the drain itself
            return StreamingResponse(_stream(calls, firsts, ep, n, include_usage, gateway),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(_collect(calls, firsts, ep, n))
        try:
            await asyncio.wait({collect, watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            closing.cancel()
            if not collect.done():  # the client went away or the drain ended: end the calls
                _cancel(calls)
                collect.cancel()
                collect.add_done_callback(_consume)
        if not collect.done():  # cancelled above: it ends later
            if gateway.closing.is_set():
                raise gateway.closing_error()
            return Response(status_code=499)  # nobody reads the answer
        try:
            choices, usage, prompt_lps = collect.result()
        except grpc.aio.AioRpcError as e:  # a failure after the first message
            _cancel(calls)
            raise from_grpc(e) from None
        body = await asyncio.to_thread(_json_body, ep, choices, usage, prompt_lps)
        return Response(body, media_type="application/json")

    return app


MAX_BATCH_PROMPTS = 64
# /detokenize: at most this many ids a call (256 max_model_len windows of 4,096; a tester's 5
# million held /health 8 s).
MAX_DETOKENIZE_IDS = 1 << 20

# A non-streaming response is held whole (its messages, then its JSON) before it is sent: at most
# this many token entries, prompts x n x max_tokens x (1 + top logprobs), each sampled token and
# each of its top logprobs one. At the limit (64 prompts x n=64 x max_tokens 12 x logprobs 20: a
# 27 MB response) the gateway's RSS peaked at 270 MiB (65 idle; CPU VM, 2026-12-05), under the
# 512 MiB of its container (deploy/base). A stream holds nothing: it has no such limit.
MAX_RESPONSE_ENTRIES = 1 << 20
DEFAULT_MAX_TOKENS = 16  # the coordinator's, for a completions request without max_tokens


def _check_response_size(reqs, ep):
    """400 for a non-streaming request whose response could exceed MAX_RESPONSE_ENTRIES, naming
    the first of the fields that multiply it: the logprobs one, n, the batch, max_tokens."""
    s = reqs[0].sampling
    n = s.n if s.HasField("n") else 1
    max_tokens = 0 if ep.echo_only else s.max_tokens if s.HasField("max_tokens") \
        else DEFAULT_MAX_TOKENS
    per_token = 1 + (ep.top_n or 0)
    # echo: each choice repeats its prompt: a character an entry, and with logprobs each of its
    # tokens as a generated one (an echo without logprobs was not counted: 64 x 64 echoes of a
    # 4,000-token prompt made a 537 MB response, a tester).
    echoed = sum(len(e.text) + (len(e.ids) * per_token if ep.top_n is not None else 0)
                 for e in ep.echoes) if ep.echoes else 0
    entries = n * (len(reqs) * max_tokens * per_token + echoed)
    if entries <= MAX_RESPONSE_ENTRIES:
        return
    if ep.top_n:
        param = "top_logprobs" if ep.chat else "logprobs"
    elif echoed > len(reqs) * max_tokens * per_token:
        param = "echo"
    elif n > 1:
        param = "n"
    elif len(reqs) > 1:
        param = "prompt"
    else:
        param = ep.max_tokens_name or "max_tokens"
    size = f"{len(reqs)} prompt(s) x n {n} x max_tokens {max_tokens} x {per_token} (each token " \
        "and its top logprobs)"
    if echoed:
        size = f"n {n} x ({len(reqs)} prompt(s) x max_tokens {max_tokens} x {per_token} (each " \
            f"token and its top logprobs) + {echoed} for the echoed prompts (characters, and " \
            "tokens with their logprobs))"
    raise bad_request(param, f"a non-streaming response of {size} = {entries} entries exceeds "
                             "the gateway's limit "
                             f"of {MAX_RESPONSE_ENTRIES}: stream it (stream: true), or ask for "
                             "fewer")


def _check_size(req, state, param):
    """413 naming `param` for a GenerateRequest over the coordinator's limit (ModelInfo's
    max_request_bytes; a coordinator that does not report one: not checked here)."""
    limit = state.info.max_request_bytes
    if limit > 0:
        size = req.ByteSize()
        if size > limit:
            s = req.sampling
            if s.ByteSize() > size // 2:  # not the prompt: the largest list of the sampling fields
                sizes = {"logit_bias": 8 * len(s.logit_bias), "stop": sum(len(x) for x in s.stop),
                         "allowed_token_ids": 5 * len(s.allowed_token_ids),
                         "stop_token_ids": 5 * len(s.stop_token_ids)}
                param = max(sizes, key=sizes.get)
            raise OpenAIError(413, f"{param}: the request for this prompt is {size} bytes; the "
                                   f"coordinator accepts at most {limit} bytes per prompt",
                              param=param, code="request_too_large")


def _prompts(prompt, max_model_len=0):
    """Completions `prompt`: a string, a list of token ids, or a batch (a list of strings or of
    token id lists, at most MAX_BATCH_PROMPTS). Returns the list of prompts. A token-id prompt
    of max_model_len ids or more (ModelInfo's; 0: not checked here) leaves no room for a token:
    400 before its ids are checked one by one."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list)):
        prompt = [prompt]  # one token-id prompt (its elements are checked below)
    elif isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt", "required: a string, a list of token ids, or a list of "
                                    "those")
    if len(prompt) > MAX_BATCH_PROMPTS:
        raise bad_request("prompt", f"a batch of {len(prompt)} prompts exceeds "
                                    f"{MAX_BATCH_PROMPTS}")
    for i, p in enumerate(prompt):
        name = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
        if isinstance(p, list) and max_model_len and len(p) >= max_model_len and \
                params.is_int(p[0]):
            raise bad_request(name, f"{len(p)} tokens leave no room for a completion in the "
                                    f"model's maximum length of {max_model_len} tokens "
                                    "(max_model_len)")
        ok = isinstance(p, str) or (isinstance(p, list) and all(params.is_int(x) for x in p))
        if not ok:
            raise bad_request(name if len(prompt) > 1 else "prompt",
                              "must be a string or a list of token ids")
        if not p:
            raise bad_request(name, "empty prompt")
        if not isinstance(p, str):
            for j, x in enumerate(p):
                if not params.INT32_MIN <= x <= params.INT32_MAX:
                    raise bad_request(f"{name}[{j}]", f"token id {x} outside the int32 range")
    return prompt


def _render_chat(state, body):
    """The prompt text of a chat body: its messages rendered by the model's chat template (or
    --chat-template), with add_generation_prompt (default true) and chat_template_kwargs. 400
    naming messages when the gateway has no template or it renders nothing."""
    if state.template is None and not state.has_model_dir:
        raise OpenAIError(400, f"the gateway cannot read the model directory "
                               f"{state.model_dir!r} for its chat template: start it with "
                               "--model-dir DIR or --chat-template FILE", param="messages")
    if state.template is None:
        raise OpenAIError(400, "the model has no chat_template in its tokenizer_config.json:"
                               " start the gateway with --chat-template FILE",
                          param="messages")
    messages = _messages(body)
    add_gen = params.get_bool(body, "add_generation_prompt")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs", "must be an object")
    text = state.template.render(messages, add_generation_prompt=add_gen is not False,
                                 extra=kwargs)
    if not text:
        raise bad_request("messages", "the chat template rendered an empty prompt")
    return text


def _messages(body):
    """Validates `messages`; text parts of a list content are joined into one string (the form
    chat templates expect)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "required: a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role", "required: a string")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or \
                        not isinstance(p.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}]",
                                      "only {\"type\": \"text\", \"text\": ...} parts are "
                                      "supported")
                parts.append(p["text"])
            content = "\n".join(parts)
        elif content is None:
            # Only an assistant turn may leave it out (OpenAI: a tool-calling turn; refused below).
            if role != "assistant":
                shown = role if len(role) <= 32 else role[:32] + "..."
                raise bad_request(f"messages[{i}].content",
                                  f"required for a '{shown}' message: a string or a list of text parts")
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content", "must be a string or a list of parts")
        if m.get("tool_calls"):
            raise bad_request(f"messages[{i}].tool_calls", "tool calling is not supported")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


class _PromptError(Exception):
    """A Generate call's error before its first message, with the index of its prompt."""

    def __init__(self, error, index):
        super().__init__(str(error))
        self.error = error
        self.index = index


async def _first(call, index):
    try:
        return await _next(call)
    except grpc.aio.AioRpcError as e:
        raise _PromptError(e, index) from None


def _prompt_error(error, index, num_prompts, chat, max_tokens_name=None):
    """The coordinator's "prompt ..." 400 names what the client sent: in a batch the prompt it
    is about (`prompt[i]`), in chat `messages` (chat has no `prompt`: the messages rendered by
    the template are the prompt), and the field the limit came from (`max_tokens_name`:
    max_completion_tokens when the chat request sent that, None when the request sent neither;
    the coordinator says max_tokens)."""
    if error.param == "prompt" and (chat or num_prompts > 1):
        error.param = "messages" if chat else f"prompt[{index}]"
        error.message = f"{error.param}: {error.message}"
    if error.param == "max_tokens" and max_tokens_name != "max_tokens":
        # A KV capacity refusal ("max_tokens: request needs N KV blocks ..."): the field sent,
        # or, when the request sent none (completions: the default 16), what it did send.
        if max_tokens_name is not None:
            error.param = max_tokens_name
        else:
            error.param = "messages" if chat else "prompt" if num_prompts == 1 else f"prompt[{index}]"
        error.message = error.param + error.message[len("max_tokens"):]
    if error.param is not None and max_tokens_name and max_tokens_name != "max_tokens":
        error.message = re.sub(r"\bmax_tokens\b", max_tokens_name, error.message)
    return error


def _consume(future):
    """Done callback of a future given up on: retrieves its outcome (no "exception was never
    retrieved" log)."""
    if not future.cancelled():
        future.exception()


def _cancel(calls):
    for c in calls:
        c.cancel()  # a no-op for a call that ended


class _Closing(Exception):
    """The gateway's drain ended the request (Gateway.end_requests)."""


async def _merged(calls, firsts, closing=None):
    """Yields (prompt index, GenerateResponse) from every call as they arrive (each call's
    first message first); raises the first call's error, or _Closing once the asyncio.Event
    `closing` is set. Closing it cancels nothing: the caller owns the calls."""
    if len(calls) == 1 and closing is None:
        msg = firsts[0]
        while msg is not None:
            yield 0, msg
            msg = await _next(calls[0])
        return
    queue = asyncio.Queue()

    async def pump(i):
        try:
            msg = firsts[i]
            while msg is not None:
                await queue.put((i, msg, None))
                msg = await _next(calls[i])
            await queue.put((i, None, None))
        except grpc.aio.AioRpcError as e:
            await queue.put((i, None, e))

    async def close():
        await closing.wait()
        await queue.put((None, None, _Closing()))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(calls))]
    if closing is not None:
        tasks.append(asyncio.ensure_future(close()))
    try:
        live = len(calls)
        while live:
            i, msg, error = await queue.get()
            if error is not None:
                raise error
            if msg is None:
                live -= 1
                continue
            yield i, msg
    finally:
        for t in tasks:
            t.cancel()


def _finish(ep, msg):
    """A completion's final message -> (finish_reason, stop_reason); echo with max_tokens 0
    generated nothing the response shows: "length", as vLLM."""
    if ep.echo_only:
        return "length", None
    return _FINISH.get(msg.finish_reason), _stop_reason(msg, ep.stop_ids)


async def _collect(calls, firsts, ep, n):
    """Every call's messages -> ([_Choice], _Usage, {prompt index: its prompt logprobs}); the
    token ids and logprobs are kept (as the protobuf messages: compact) only when the response
    has logprobs."""
    choices = [_Choice() for _ in range(n * len(calls))]
    usage = _Usage()
    prompt_lps = {}
    async for p, msg in _merged(calls, firsts):
        c = choices[p * n + msg.index]
        if msg.prompt_logprobs and p not in prompt_lps:
            prompt_lps[p] = list(msg.prompt_logprobs)
        if not ep.echo_only:
            c.text.append(msg.text)
            if ep.top_n is not None:
                c.token_ids.extend(msg.token_ids)
                c.logprobs.extend(msg.logprobs)
        if msg.final:
            c.finish_reason, c.stop_reason = _finish(ep, msg)
            usage.add(p, msg, generated=not ep.echo_only)
    return choices, usage, prompt_lps


def _json_body(ep, choices, usage, prompt_lps):
    """The non-streaming response's JSON bytes, built one choice at a time (each choice's dicts
    freed once it is serialized: a 64-prompt x n=64 batch with logprobs took 544 MiB as one
    dict). Runs on a worker thread (asyncio.to_thread): the loop serves meanwhile."""
    head = ep.envelope([], chunk=False)
    del head["choices"]
    parts = [_dumps(head)[:-1].encode(), b',"choices":[']
    for i, c in enumerate(choices):
        text = "".join(c.text)
        echo_text, echo_lp = ep.echo(i, prompt_lps.get(i // ep.n, [])) if ep.echoes else ("", None)
        lp = _joined_logprobs(echo_lp, ep.logprobs(i, c.token_ids, c.logprobs, text))
        text = echo_text + text
        if i:
            parts.append(b",")
        parts.append(_dumps(ep.choice(i, text, lp, c.finish_reason, c.stop_reason,
                                      False)).encode())
        choices[i] = None
    parts.append(b'],"usage":' + _dumps(usage.body()).encode() + b"}")
    return b"".join(parts)


def _dumps(obj):
    """JSON as Starlette's JSONResponse writes it (compact, UTF-8 text)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def _stream(calls, firsts, ep, n, include_usage, gateway):
    usage = _Usage()

    def event(index, text, lp, finish, stop):
        chunk = ep.envelope([ep.choice(index, text, lp, finish, stop, True)], chunk=True)
        if include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def echo_events(p, prompt_lps):
        """Each choice of prompt p: its echoed prompt, as the first chunk of its text."""
        return [event(p * n + i, *ep.echo(p * n + i, prompt_lps), None, None) for i in range(n)]

    def events(p, msg):
        finish = stop = None
        if msg.final:
            finish, stop = _finish(ep, msg)
            usage.add(p, msg, generated=not ep.echo_only)
        if ep.echo_only:  # the generated token is left out: the final chunk only
            return [event(p * n + msg.index, "", ep.logprobs(p * n + msg.index, [], [], ""),
                          finish, stop)] if msg.final else []
        if msg.text or msg.token_ids or msg.final:
            index = p * n + msg.index
            lp = ep.logprobs(index, msg.token_ids, msg.logprobs, msg.text)
            return [event(index, msg.text, lp, finish, stop)]
        return []

    # echo with logprobs: a prompt's messages wait until its prompt logprobs arrive (with its
    # call's first token), since its choices' echoed prompts come first. A one-token prompt has
    # none to wait for.
    held = {}  # prompt index -> its messages so far
    echoed = set()  # prompts whose choices' echoes went out
    try:
        if ep.chat:
            for i in range(n):
                c = ep.choice(i, "", None, None, None, True, first=True)
                yield _sse(ep.envelope([c], chunk=True) | ({"usage": None} if include_usage
                                                            else {}))
        if ep.echoes is not None:
            for p in range(len(calls)):
                if ep.top_n is None or len(ep.echoes[p].ids) <= 1:
                    for e in echo_events(p, []):
                        yield e
                    echoed.add(p)
        async for p, msg in _merged(calls, firsts, gateway.closing):
            if ep.echoes is not None and p not in echoed:
                held.setdefault(p, []).append(msg)
                if not msg.prompt_logprobs and not msg.final:
                    continue
                for e in echo_events(p, list(msg.prompt_logprobs)):
                    yield e
                echoed.add(p)
                msgs = held.pop(p)
            else:
                msgs = (msg,)
            for m in msgs:
                for e in events(p, m):
                    yield e
        if include_usage:
            chunk = ep.envelope([], chunk=True)
            chunk["usage"] = usage.body()
            yield _sse(chunk)
    except grpc.aio.AioRpcError as e:
        yield _sse(from_grpc(e).body())
    except _Closing:  # as the coordinator's drain timeout: an error event, then [DONE]
        yield _sse(gateway.closing_error().body())
    finally:
        _cancel(calls)  # ends them when the client went away
    yield "data: [DONE]\n\n"

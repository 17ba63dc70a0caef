"""The request mapping (gateway/lorcserve_gateway/params.py) and the gRPC -> HTTP error table
(errors.py), without servers. ctest GatewayParams:
  /usr/bin/python3 tests/gateway/params_test.py (protoc generates the stubs into a temp dir)."""

import asyncio
import json
import os
import re
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "gateway"))

import grpc  # noqa: E402

from lorcserve_gateway import errors, params, server, stubs  # noqa: E402
from lorcserve_gateway.errors import OpenAIError  # noqa: E402

_TMP = tempfile.TemporaryDirectory()
pb2, _ = stubs.load(_TMP.name, os.path.join(REPO, "proto"))


def sampling(body, defaults=None, max_tokens=None):
    s = pb2.SamplingOptions()
    params.fill_sampling(s, params.strip_nulls(body), defaults, max_tokens)
    return s


class FillSamplingTest(unittest.TestCase):
    def test_every_field_mapped(self):
        s = sampling({"temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1,
                      "repetition_penalty": 1.2, "presence_penalty": 0.5,
                      "frequency_penalty": -0.5, "seed": 42, "n": 3, "stop": ["\n", "END"],
                      "stop_token_ids": [5], "allowed_token_ids": [1, 2, 3],
                      "logit_bias": {"17": -100, "18": 2.5}, "ignore_eos": True,
                      "include_stop_str_in_output": True, "min_tokens": 4, "user": "u1"},
                     max_tokens=20)
        self.assertAlmostEqual(s.temperature, 0.5)
        self.assertAlmostEqual(s.top_p, 0.9, places=6)
        self.assertEqual(s.top_k, 7)
        self.assertAlmostEqual(s.min_p, 0.1, places=6)
        self.assertAlmostEqual(s.repetition_penalty, 1.2, places=6)
        self.assertAlmostEqual(s.presence_penalty, 0.5)
        self.assertAlmostEqual(s.frequency_penalty, -0.5)
        self.assertEqual(s.seed, 42)
        self.assertEqual(s.n, 3)
        self.assertEqual(list(s.stop), ["\n", "END"])
        self.assertEqual(list(s.stop_token_ids), [5])
        self.assertEqual(list(s.allowed_token_ids), [1, 2, 3])
        self.assertEqual(dict(s.logit_bias), {17: -100.0, 18: 2.5})
        self.assertTrue(s.ignore_eos and s.include_stop_str_in_output)
        self.assertEqual(s.min_tokens, 4)
        self.assertEqual(s.max_tokens, 20)

    def test_defaults(self):
        s = sampling({})
        self.assertEqual(s.temperature, 1.0)  # OpenAI's default, not the proto's greedy 0
        self.assertFalse(s.HasField("max_tokens"))  # lorcserve's (and OpenAI's) 16
        self.assertFalse(s.HasField("n"))
        self.assertFalse(s.HasField("seed"))
        model = pb2.GenerationDefaults(present=True, temperature=0.6, top_p=0.9, top_k=50)
        s = sampling({}, defaults=model)
        self.assertAlmostEqual(s.temperature, 0.6, places=6)
        self.assertAlmostEqual(s.top_p, 0.9, places=6)
        self.assertEqual(s.top_k, 50)
        s = sampling({"temperature": 0, "top_k": -1}, defaults=model)
        self.assertEqual(s.temperature, 0.0)
        self.assertEqual(s.top_k, 0)  # vLLM's -1: off
        self.assertEqual(list(sampling({"stop": "x"}).stop), ["x"])

    def assert_400(self, body, param, fields=None):
        with self.assertRaises(OpenAIError) as cm:
            if fields is not None:
                params.check_fields(body, fields)
            else:
                sampling(body)
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(cm.exception.param, param)
        self.assertTrue(cm.exception.message.startswith(param + ":"), cm.exception.message)

    def test_invalid_values_name_the_field(self):
        self.assert_400({"temperature": "hot"}, "temperature")
        self.assert_400({"temperature": True}, "temperature")
        self.assert_400({"temperature": -0.1}, "temperature")
        self.assert_400({"seed": -1}, "seed")
        self.assert_400({"seed": 1.5}, "seed")
        self.assert_400({"n": "2"}, "n")
        self.assert_400({"stop": [1]}, "stop")
        self.assert_400({"stop": ["a", ""]}, "stop[1]")
        self.assert_400({"logit_bias": {"x": 1}}, "logit_bias")
        self.assert_400({"logit_bias": {"3": "1"}}, "logit_bias")
        self.assert_400({"stop_token_ids": [1, "2"]}, "stop_token_ids")
        self.assert_400({"ignore_eos": 1}, "ignore_eos")
        self.assert_400({"min_tokens": -1}, "min_tokens")
        self.assert_400({"user": 5}, "user")

    def test_out_of_range_and_non_finite_values_are_400_not_500(self):
        # int32 proto fields: protobuf raised ValueError (a 500) before they were bounded.
        for field in ("n", "top_k", "min_tokens"):
            self.assert_400({field: 2**31}, field)
        self.assert_400({"stop_token_ids": [1, 2**31]}, "stop_token_ids[1]")
        self.assert_400({"allowed_token_ids": [-2**40]}, "allowed_token_ids[0]")
        self.assert_400({"logit_bias": {"99999999999": 1}}, "logit_bias")
        self.assert_400({"logit_bias": {" 5 ": 1}}, "logit_bias")  # int() took these
        self.assert_400({"logit_bias": {"1_0": 1}}, "logit_bias")
        self.assert_400({"logit_bias": {"5": float("nan")}}, "logit_bias")
        self.assert_400({"seed": 2**64}, "seed")
        self.assertEqual(sampling({"seed": 2**64 - 1}).seed, 2**64 - 1)
        self.assertEqual(dict(sampling({"logit_bias": {"-3": 1}}).logit_bias), {-3: 1.0})
        # JSON's 1e400 parses as inf; NaN and Infinity literals are refused by the JSON reader.
        for field in ("temperature", "top_p", "min_p", "presence_penalty"):
            self.assert_400({field: float("inf")}, field)
            self.assert_400({field: float("nan")}, field)
        req = pb2.GenerateRequest()
        with self.assertRaises(OpenAIError) as cm:
            params.fill_request(req, {"priority": 2**31})
        self.assertEqual(cm.exception.param, "priority")
        self.assertEqual(sampling({}, max_tokens=2**40).max_tokens, 2**31 - 1)  # clamped

    def test_values_the_proto_cannot_hold_name_the_field(self):
        # 1e308 is finite JSON but inf as a proto float: the coordinator's message said "got inf".
        for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
            self.assert_400({field: 1e308}, field)
            self.assert_400({field: -1e39}, field)
        self.assertAlmostEqual(sampling({"temperature": 3e38}).temperature, 3e38, delta=1e32)
        # A lone empty stop string is `stop`, not the `stop[0]` of a list the client never sent.
        self.assert_400({"stop": ""}, "stop")

    def test_integers_past_floats_range_name_the_field(self):
        # A JSON integer of 401 digits is exact in Python: math.isfinite / float() raised
        # OverflowError (a 500).
        for v in (10**400, -10**400):
            for field in ("temperature", "top_p", "min_p", "repetition_penalty",
                          "presence_penalty", "frequency_penalty"):
                self.assert_400({field: v}, field)
            self.assert_400({"logit_bias": {"5": v}}, "logit_bias")
        self.assertEqual(dict(sampling({"logit_bias": {"5": -100}}).logit_bias), {5: -100.0})
        self.assertEqual(sampling({"temperature": 2}).temperature, 2.0)

    def test_echoed_input_is_clipped(self):
        # A 5 MB unknown field name came back twice (message and param): a 10 MB error.
        with self.assertRaises(OpenAIError) as cm:
            params.check_fields({"k" * 5_000_000: 1}, params.COMPLETION_FIELDS)
        self.assertEqual(cm.exception.param, "k" * 99 + "\u2026")
        self.assertLess(len(cm.exception.message), 200)
        for body in ({"temperature": "x" * 1_000_000}, {"n": 10**4000},
                     {"logit_bias": {"y" * 1_000_000: 1}}, {"logit_bias": {"5": "z" * 10**6}}):
            with self.assertRaises(OpenAIError) as cm:
                sampling(body)
            self.assertLess(len(cm.exception.message), 300, list(body))
        with self.assertRaises(OpenAIError) as cm:
            server.Gateway.check_model({"model": "m" * 1_000_000},
                                       server._ModelState("tiny", None, None, None))
        self.assertEqual(cm.exception.status, 404)
        self.assertLess(len(cm.exception.message), 300)

    def test_max_tokens_beyond_the_model_length_names_the_field_sent(self):
        # The coordinator's message named `prompt` and a clamped 2147483647 the client never sent.
        for name in ("max_tokens", "max_completion_tokens"):
            s = pb2.SamplingOptions()
            with self.assertRaises(OpenAIError) as cm:
                params.fill_sampling(s, {}, None, 10**20, max_model_len=4096, max_tokens_name=name)
            self.assertEqual(cm.exception.param, name)
            self.assertIn("100000000000000000000 exceeds the model's maximum length of 4096",
                          cm.exception.message)
        s = pb2.SamplingOptions()
        params.fill_sampling(s, {}, None, 4096, max_model_len=4096)
        self.assertEqual(s.max_tokens, 4096)

    def test_lists_longer_than_the_vocabulary_are_refused_before_their_entries(self):
        # A 4,000,000-key logit_bias went to the coordinator (or to a 413 naming `prompt`).
        for body, field in (({"logit_bias": {str(i): 1 for i in range(11)}}, "logit_bias"),
                            ({"allowed_token_ids": list(range(11))}, "allowed_token_ids")):
            s = pb2.SamplingOptions()
            with self.assertRaises(OpenAIError) as cm:
                params.fill_sampling(s, body, None, None, vocab_size=10)
            self.assertEqual(cm.exception.param, field)
            self.assertIn("more than the vocabulary's 10 tokens", cm.exception.message)
        s = pb2.SamplingOptions()
        params.fill_sampling(s, {"logit_bias": {str(i): 1 for i in range(10)}}, None, None,
                             vocab_size=10)
        self.assertEqual(len(s.logit_bias), 10)

    def test_unsupported_fields_are_rejected(self):
        c = params.COMPLETION_FIELDS
        self.assert_400({"frobnicate": 1}, "frobnicate", c)
        self.assert_400({"suffix": "x"}, "suffix", c)
        self.assert_400({"best_of": 3, "n": 2}, "best_of", c)
        self.assert_400({"messages": []}, "messages", c)  # a chat field on completions
        ch = params.CHAT_FIELDS
        self.assert_400({"tools": [{"type": "function"}]}, "tools", ch)
        self.assert_400({"tool_choice": "auto"}, "tool_choice", ch)
        self.assert_400({"response_format": {"type": "json_object"}}, "response_format", ch)
        self.assert_400({"store": True}, "store", ch)
        self.assert_400({"prompt": "x"}, "prompt", ch)
        # what is the default anyway passes
        params.check_fields({"echo": False, "best_of": 2, "n": 2}, c)
        params.check_fields({"tools": [], "tool_choice": "none",
                             "response_format": {"type": "text"}, "store": False}, ch)

    def test_stream_options(self):
        self.assertEqual(params.stream_flags({}), (False, False))
        self.assertEqual(params.stream_flags({"stream": True, "stream_options": {
            "include_usage": True}}), (True, True))
        with self.assertRaises(OpenAIError) as cm:
            params.stream_flags({"stream_options": {"include_usage": True}})
        self.assertEqual(cm.exception.param, "stream_options")
        with self.assertRaises(OpenAIError) as cm:
            params.stream_flags({"stream": True, "stream_options": {"continuous": True}})
        self.assertEqual(cm.exception.param, "stream_options.continuous")

    def test_extension_fields(self):
        req = pb2.GenerateRequest()
        params.fill_request(req, {"session_id": "s1", "cache_salt": "t", "priority": 3})
        self.assertEqual((req.session_id, req.cache_salt, req.priority), ("s1", "t", 3))


class _FakeRpcError:
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _FakeRequest:
    """What server._read_json and Gateway.metadata use of a Starlette request."""

    def __init__(self, body=b"", headers=None):
        self.headers = headers or {}
        self._body = body

    async def stream(self):
        for i in range(0, len(self._body), 1 << 20):
            yield self._body[i:i + (1 << 20)]


def read_json(raw, headers=None):
    return asyncio.run(server._read_json(_FakeRequest(raw, headers)))


class RequestBodyTest(unittest.TestCase):
    def assert_400(self, raw, param, text):
        with self.assertRaises(OpenAIError) as cm:
            read_json(raw)
        self.assertEqual((cm.exception.status, cm.exception.param), (400, param))
        self.assertIn(text, cm.exception.message)
        json.dumps(cm.exception.body(), ensure_ascii=False).encode()  # answerable as UTF-8

    def test_hostile_bodies(self):
        self.assertEqual(read_json(b'{"a": [1, {"b": "\\ud83d\\ude00"}], "c": null}'),
                         {"a": [1, {"b": "\U0001F600"}]})  # a surrogate pair is fine
        self.assert_400(b'{"temperature": NaN}', None, "NaN is not a JSON value")
        self.assert_400(b'{"temperature": -Infinity}', None, "-Infinity is not a JSON value")
        self.assert_400(b'{"prompt": "\\ud800"}', "prompt", "lone surrogate U+D800")
        self.assert_400(b'{"messages": [{"role": "user", "content": "a\\udfff"}]}',
                        "messages[0].content", "lone surrogate U+DFFF at character 1")
        self.assert_400(b'{"logit_bias": {"\\ud800": 1}}', "logit_bias.\\ud800",
                        "lone surrogate")
        self.assert_400(b"[" * 100000 + b"]" * 100000, None, "nested too deeply")
        self.assert_400(b'{"a":' + b"[" * 100 + b"]" * 100 + b"}", None, "deeper than 64")
        self.assert_400(b'{"prompt": "\xff"}', None, "not valid JSON")  # not UTF-8

    def test_a_message_without_content_names_it(self):
        for body, param in (({"messages": [{"role": "user"}]}, "messages[0].content"),
                            ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": None}]},
                             "messages[1].content")):
            with self.assertRaises(OpenAIError) as cm:
                server._messages(body)
            self.assertEqual((cm.exception.status, cm.exception.param), (400, param))
            self.assertIn("required for a 'user' message", cm.exception.message)
        with self.assertRaises(OpenAIError) as cm:  # a long role is not echoed whole
            server._messages({"messages": [{"role": "r" * 10000}]})
        self.assertLess(len(cm.exception.message), 200)
        # An assistant turn may leave it out (its content is then empty).
        self.assertEqual(server._messages({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": None}]})[1]["content"], "")

    def test_body_size_limit(self):
        big = b'{"prompt": "' + b"x" * server.MAX_REQUEST_BODY_BYTES + b'"}'
        for headers in ({}, {"content-length": str(len(big))}):  # chunked, or declared
            with self.assertRaises(OpenAIError) as cm:
                read_json(big, headers)
            self.assertEqual(cm.exception.status, 413)

    def test_prompt_token_ids_in_int32(self):
        with self.assertRaises(OpenAIError) as cm:
            server._prompts([[1, 2], [3, 2**31]])
        self.assertEqual(cm.exception.param, "prompt[1][1]")
        with self.assertRaises(OpenAIError) as cm:
            server._prompts([5_000_000_000])
        self.assertEqual(cm.exception.param, "prompt[0]")


class AuthorizationTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        tokens = os.path.join(self.tmp.name, "tokens")
        with open(tokens, "w") as f:
            f.write("secret\n")
        self.open = server.Gateway(server.Options("127.0.0.1:1"), pb2, None)
        self.auth = server.Gateway(server.Options("127.0.0.1:1", auth_token_file=tokens),
                                   pb2, None)

    def tearDown(self):
        self.tmp.cleanup()

    def test_non_ascii_header_is_401_not_forwarded(self):
        # grpc.aio never ended a call with such metadata: the request hung.
        for gw in (self.open, self.auth):
            with self.assertRaises(OpenAIError) as cm:
                gw.metadata(_FakeRequest(headers={"authorization": "Bearer \u00e9"}))
            self.assertEqual(cm.exception.status, 401)
            self.assertEqual(gw.metadata(_FakeRequest(headers={"authorization": "Bearer a\tb"}),
                                         check=False), ())  # /health: just not forwarded
            # Past gRPC's metadata limit the coordinator answered RESOURCE_EXHAUSTED: a 429
            # that SDKs retry.
            with self.assertRaises(OpenAIError) as cm:
                gw.metadata(_FakeRequest(headers={"authorization": "Bearer " + "a" * 5000}))
            self.assertEqual(cm.exception.status, 401)

    def test_scheme_in_any_case(self):
        for header in ("Bearer secret", "bearer secret", "BEARER  secret "):
            self.assertEqual(self.auth.metadata(_FakeRequest(headers={"authorization": header})),
                             (("authorization", "Bearer secret"),))
        for header in ("Basic secret", "Bearer", "Bearer other"):
            with self.assertRaises(OpenAIError) as cm:
                self.auth.metadata(_FakeRequest(headers={"authorization": header}))
            self.assertEqual(cm.exception.status, 401)


class ModelStateTest(unittest.TestCase):
    def test_a_snapshot_of_a_loading_coordinator_is_asked_again(self):
        # A tester's gateway kept the snapshot taken while the coordinator loaded (no KV cache
        # size yet): every chat request without max_tokens was then refused as "can never fit".
        gw = server.Gateway(server.Options("127.0.0.1:1", model_dir=tempfile.gettempdir()),
                            pb2, None)
        infos = [pb2.ModelInfoResponse(model="m", max_model_len=4096, serving=False),
                 pb2.ModelInfoResponse(model="m", max_model_len=4096, serving=True, block_size=16,
                                       kv_capacity_blocks=40)]
        calls = []

        class Stub:
            async def ModelInfo(self, request, metadata=None):
                calls.append(metadata)
                return infos[min(len(calls), len(infos)) - 1]

        gw.stub = Stub()
        metadata = (("authorization", "Bearer t"),)

        async def run():
            gw.state_lock = asyncio.Lock()
            loading = await gw.model_state(metadata)
            self.assertEqual(loading.info.kv_capacity_blocks, 0)
            serving = await gw.model_state(metadata)  # asked again: it was not serving
            self.assertEqual(serving.info.kv_capacity_blocks, 40)
            self.assertIs(await gw.model_state(metadata), serving)  # now kept
        asyncio.run(run())
        self.assertEqual(len(calls), 2)


class FlagsTest(unittest.TestCase):
    def test_bad_flags_exit_2_naming_the_flag(self):
        import contextlib
        import importlib
        import io
        cli = importlib.import_module("lorcserve_gateway.__main__")
        for argv, text in [(["--port", "99999"], "--port"),  # was bind()'s OverflowError
                           (["--port", "-1"], "--port"),
                           (["--log-level", "loud"], "--log-level"),  # was uvicorn's KeyError
                           (["--coordinator", " "], "--coordinator")]:
            err = io.StringIO()
            with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(err):
                cli.parse_args(["--coordinator", "127.0.0.1:1"] + argv)
            self.assertEqual(cm.exception.code, 2)
            self.assertIn(text, err.getvalue())
        self.assertEqual(cli.parse_args(["--coordinator", "h:1", "--port", "0"]).port, 0)

    def test_tls_ca_without_a_certificate_is_refused_at_start(self):
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write("not a certificate\n")
            f.flush()
            with self.assertRaisesRegex(ValueError, "--tls-ca .*no PEM certificate"):
                server.Gateway(server.Options("127.0.0.1:1", tls_ca=f.name), pb2, None)


class ChatDefaultMaxTokensTest(unittest.TestCase):
    """The chat default (no max_tokens) is capped by what the whole KV cache holds for the n
    completions, counted as the coordinator's admission check counts them (scheduler.cc Add),
    so that the coordinator never refuses it as "can never fit" (a tester hit that, 2026-12-05)."""

    @staticmethod
    def blocks_needed(prompt_len, max_tokens, n, bs):  # scheduler.cc, Scheduler::Add
        cached = prompt_len + max_tokens - 1
        shared = prompt_len // bs if n > 1 else 0
        return shared + n * (-(-cached // bs) - shared)

    def test_the_largest_that_fits(self):
        from types import SimpleNamespace
        for bs in (1, 4, 16):
            for capacity in (3, 64, 256, 3000):
                for prompt_len in (1, 5, 16, 17, 200):
                    for n in (1, 2, 3, 9):
                        info = SimpleNamespace(block_size=bs, kv_capacity_blocks=capacity)
                        m = server.max_tokens_that_fit(prompt_len, n, info)
                        case = (bs, capacity, prompt_len, n, m)
                        if m >= 1:
                            self.assertLessEqual(self.blocks_needed(prompt_len, m, n, bs),
                                                 capacity, case)
                        self.assertGreater(self.blocks_needed(prompt_len, max(m, 0) + 1, n, bs),
                                           capacity, case)
        unknown = SimpleNamespace(block_size=0, kv_capacity_blocks=0)
        self.assertEqual(server.max_tokens_that_fit(10, 2, unknown), 2**31 - 1)


class CoordinatorErrorTest(unittest.TestCase):
    def test_coordinator_400_names_the_field(self):
        for details, param in [("top_p must be in (0, 1], got 7", "top_p"),
                               ("stop[0]: stop string of 600 bytes exceeds 512", "stop[0]"),
                               ("logit_bias: id 5000000 outside the vocabulary", "logit_bias"),
                               ("prompt (9000 tokens) + max_tokens (4) = 9004 exceeds", "prompt"),
                               ("the model is loading", None)]:
            e = errors.from_grpc(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, details))
            self.assertEqual(e.param, param, details)
        e = errors.from_grpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "n: down"))
        self.assertIsNone(e.param)  # only 400s name a field


class ResponseTest(unittest.TestCase):
    def test_socket_closed_says_the_coordinator_stopped(self):
        # A plaintext coordinator that died mid-stream was said to need --tls-ca.
        # A coordinator killed with data unread resets the connection instead (seen in CI on
        # 2026-12-05: the same test read "recvmsg:Connection reset by peer").
        for detail in ("Socket closed", "recvmsg:Connection reset by peer"):
            e = errors.from_grpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, detail))
            self.assertEqual(e.status, 503)
            self.assertRegex(e.message, "^" + re.escape(detail) +
                             r" \(the coordinator stopped or closed the connection; if this "
                             r"gateway never reached it, it may use TLS: .*--tls-ca")

    def test_chat_length_error_names_messages(self):
        detail = "prompt (9000 tokens) + max_tokens (1) = 9001 exceeds the maximum model length"
        e = server._prompt_error(errors.from_grpc(_FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, detail)), 0, 1, True)
        self.assertEqual(e.param, "messages")
        self.assertTrue(e.message.startswith("messages: prompt (9000 tokens)"), e.message)
        e = server._prompt_error(errors.from_grpc(_FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, detail)), 1, 2, False)
        self.assertEqual(e.param, "prompt[1]")
        # A chat request's limit from max_completion_tokens is named so (a tester, 2026-12-05).
        e = server._prompt_error(errors.from_grpc(_FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, detail)), 0, 1, True, "max_completion_tokens")
        self.assertTrue(e.message.startswith(
            "messages: prompt (9000 tokens) + max_completion_tokens (1) = 9001"), e.message)
        # The coordinator's KV capacity refusal starts with max_tokens: in chat the field sent,
        # or the messages when the gateway chose max_tokens itself.
        capacity = ("max_tokens: request needs 509 KV blocks for n = 2 completions of 4094 cached "
                     "tokens (prompt + max_tokens - 1; ...): it can never fit (lower n or "
                     "max_tokens, or shorten the prompt)")
        for chat, name, param in [(True, "max_completion_tokens", "max_completion_tokens"),
                                  (True, "max_tokens", "max_tokens"), (True, None, "messages"),
                                  (False, "max_tokens", "max_tokens"), (False, None, "prompt")]:
            e = server._prompt_error(errors.from_grpc(_FakeRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, capacity)), 0, 1, chat, name)
            self.assertEqual(e.param, param)
            self.assertTrue(e.message.startswith(param + ": request needs 509"), e.message)
            if name == "max_completion_tokens":  # every mention, not only the first
                self.assertNotRegex(e.message, r"\bmax_tokens\b")
                self.assertIn("lower n or max_completion_tokens", e.message)

    def test_stop_reason(self):
        info = pb2.ModelInfoResponse(eos_token_ids=[1, 7])
        s = pb2.SamplingOptions(stop_token_ids=[1, 5])
        ids = server._reported_stop_ids(s, info)
        self.assertEqual(ids, {5})  # EOS is null (vLLM), unless ignore_eos
        s.ignore_eos = True
        self.assertEqual(server._reported_stop_ids(s, info), {1, 5})
        for msg, reason in ((pb2.GenerateResponse(stop_token_id=1), None),
                            (pb2.GenerateResponse(stop_token_id=7), None),
                            (pb2.GenerateResponse(stop_token_id=5), 5),
                            (pb2.GenerateResponse(stop_string="END"), "END"),
                            (pb2.GenerateResponse(), None)):
            self.assertEqual(server._stop_reason(msg, ids), reason, msg)

    def test_completion_logprobs_of_partial_characters(self):
        # U+4E2D in three byte-fallback tokens, then "a": distinct keys (OpenAI's "bytes:"),
        # the sampled token's own logprob, and text_offset within the text "\u4e2da".
        vocab = server.Vocab({10: b"\xe4", 11: b"\xb8", 12: b"\xad", 13: b"\xe5", 14: b"a"})
        lp = pb2.TokenLogprobs
        top = pb2.TopLogprob
        lps = [lp(logprob=-1, top=[top(id=13, logprob=-0.5), top(id=10, logprob=-1)]),
               lp(logprob=-2, top=[top(id=11, logprob=-2), top(id=12, logprob=-3)]),
               lp(logprob=-3, top=[top(id=11, logprob=-2), top(id=12, logprob=-3)]),
               lp(logprob=-4, top=[top(id=14, logprob=-4)])]
        out = server._completion_logprobs(vocab, [10, 11, 12, 14], lps, server._TextOffsets(),
                                          2)
        self.assertEqual(out["tokens"], ["bytes:\\xe4", "bytes:\\xb8", "bytes:\\xad", "a"])
        self.assertEqual(out["top_logprobs"][0], {"bytes:\\xe5": -0.5, "bytes:\\xe4": -1})
        self.assertEqual(out["top_logprobs"][2], {"bytes:\\xb8": -2, "bytes:\\xad": -3})
        self.assertEqual(out["text_offset"], [0, 0, 0, 1])
        # An EOS token adds no text: its offset is the text's end, not past it.
        offsets = server._TextOffsets()
        out = server._completion_logprobs(server.Vocab({1: b"<|end_of_text|>", 14: b"a"}),
                                          [14, 1, 14], [lp(), lp(), lp()], offsets, 1)
        self.assertEqual(out["text_offset"], [0, 1, 1])


class GrpcMappingTest(unittest.TestCase):
    def test_status_table(self):
        for code, status, type_ in [
                (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
                (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
                (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
                (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
                (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
                (grpc.StatusCode.INTERNAL, 500, "internal_error")]:
            e = errors.from_grpc(_FakeRpcError(code, "why"))
            self.assertEqual((e.status, e.type), (status, type_), code)
            body = e.body()["error"]
            self.assertEqual(set(body), {"message", "type", "param", "code"})
            self.assertIn("why", body["message"])
            self.assertIn(code.name, body["message"])


if __name__ == "__main__":
    unittest.main()

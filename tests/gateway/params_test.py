"""The request mapping (gateway/lorcserve_gateway/params.py) and the gRPC -> HTTP error table
(errors.py), without servers. ctest GatewayParams:
  /usr/bin/python3 tests/gateway/params_test.py (protoc generates the stubs into a temp dir)."""

import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "gateway"))

import grpc  # noqa: E402

from lorcserve_gateway import errors, params, stubs  # noqa: E402
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

    def test_unsupported_fields_are_rejected(self):
        c = params.COMPLETION_FIELDS
        self.assert_400({"frobnicate": 1}, "frobnicate", c)
        self.assert_400({"echo": True}, "echo", c)
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

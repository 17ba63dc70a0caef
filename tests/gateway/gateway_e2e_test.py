"""End to end: the gateway (scripts/gateway.sh) in front of real coordinators serving the
fixture model on the CPU backend, driven by the official OpenAI Node SDK (sdk_test.mjs) and by
plain curl. ctest GatewayE2E:
  /usr/bin/python3 tests/gateway/gateway_e2e_test.py --lorcserve build/bin/lorcserve \
      --model models/tiny-llama-a --build-dir build

Servers: coordinator A (defaults) behind gateway A (no auth); coordinator B
(--auth-token-file, --max-num-seqs 1 --max-waiting 1: a full queue is easy to reach) behind
gateway B (checks the same tokens itself) and gateway B2 (no tokens of its own: forwards the
caller's to the coordinator); gateway C points at a port where nothing listens.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "scripts", "lib"))
from lorc_process import wait_for  # noqa: E402
ARGS = None
MODEL_NAME = "tiny-llama-a"
TOKEN = "gateway-e2e-token"
GREEDY_PROMPT = "The meaning of the word"


def curl(url, body=None, headers=(), stream=False, timeout=120):
    """(HTTP status, response text) of one request through the curl CLI."""
    cmd = ["curl", "-sS", "-N" if stream else "-s", "-w", "\n%{http_code}", url,
           "--max-time", str(timeout)]
    data = None
    if body is not None:  # on stdin: a body of megabytes is over the argument list's limit
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        data = json.dumps(body)
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, input=data)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), text


def long_stream(base):
    """A streaming completion of 3000 tokens through curl at gateway `base`, returned (Popen,
    stdout a text pipe) once its first chunk arrived: the request is running."""
    proc = subprocess.Popen(
        ["curl", "-sN", f"{base}/v1/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": MODEL_NAME, "prompt": "x", "max_tokens": 3000,
                           "ignore_eos": True, "stream": True})],
        stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


class Servers:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.token_file = os.path.join(tmp, "tokens")
        with open(self.token_file, "w") as f:
            f.write(f"# e2e\n{TOKEN}\n")

    def start(self, name, argv, prefix):
        out = os.path.join(self.tmp, f"{name}.out")
        with open(out, "w") as o, open(os.path.join(self.tmp, f"{name}.err"), "w") as e:
            proc = subprocess.Popen(argv, stdout=o, stderr=e, start_new_session=True)
        self.procs.append(proc)
        return proc, wait_for(proc, out, prefix)

    def coordinator(self, name, *flags):
        return self.start(name, [ARGS.lorcserve, "coordinator", "--model", ARGS.model,
                                 "--listen", "127.0.0.1:0", "--local-workers", "1",
                                 "--backend", "cpu", "--threads", "1", *flags], "LISTENING")

    def gateway(self, name, coordinator, *flags):
        env_build = ["env", f"BUILD_DIR={ARGS.build_dir}"]
        return self.start(name, env_build + [
            os.path.join(REPO, "scripts", "gateway.sh"), "--coordinator", coordinator,
            "--port", "0", "--chat-template", os.path.join(HERE, "llama3_chat_template.jinja"),
            *flags], "GATEWAY_LISTENING")[1]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_serving(url, headers=(), timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if curl(f"{url}/health", headers=headers)[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health never answered 200")


class GatewayE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="lorc-gateway-e2e-")
        cls.s = Servers(cls.tmp)
        s = cls.s
        cls.coord_a_proc, cls.coord_a = s.coordinator("coord_a")
        cls.coord_b_proc, cls.coord_b = s.coordinator(
            "coord_b", "--auth-token-file", s.token_file, "--max-num-seqs", "1",
            "--max-waiting", "1")
        cls.a = "http://" + s.gateway("gw_a", cls.coord_a)
        cls.b = "http://" + s.gateway("gw_b", cls.coord_b, "--auth-token-file", s.token_file)
        cls.b2 = "http://" + s.gateway("gw_b2", cls.coord_b)
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{sock.getsockname()[1]}"
        cls.c = "http://" + s.gateway("gw_c", dead, "--served-model-name", MODEL_NAME)
        wait_serving(cls.a)
        wait_serving(cls.b)  # /health needs no token (kubelet probes)
        # The gRPC stubs the gateway generated, for looking at the coordinator directly.
        sys.path.insert(0, os.path.join(REPO, "gateway"))
        from lorcserve_gateway import stubs
        import grpc
        cls.pb2, pb2_grpc = stubs.load(os.path.join(ARGS.build_dir, "gateway_stubs"))
        cls.pb2_grpc = pb2_grpc
        cls.grpc = grpc
        cls.stub_a = pb2_grpc.LorcServeStub(grpc.insecure_channel(cls.coord_a))

    @classmethod
    def tearDownClass(cls):
        cls.s.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def greedy_reference(self, max_tokens=24):
        out = subprocess.run([ARGS.lorcserve, "generate", "--model", ARGS.model, "--backend",
                              "cpu", "--prompt", GREEDY_PROMPT, "--max-tokens", str(max_tokens),
                              "--json"], capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        return json.loads(out.stdout)["text"]

    # -- the official SDK ------------------------------------------------------------------
    def test_node_sdk(self):
        env = dict(os.environ, GATEWAY_URL=self.a, AUTH_URL=self.b, AUTH_TOKEN=TOKEN,
                   DEAD_URL=self.c,
                   MODEL=MODEL_NAME, GREEDY_PROMPT=GREEDY_PROMPT,
                   GREEDY_TEXT=self.greedy_reference(),
                   NODE_PATH=os.path.join(ARGS.node_modules))
        script = os.path.join(ARGS.node_modules, "..", "sdk_test.mjs")
        out = subprocess.run(["node", script], env=env, capture_output=True, text=True,
                             timeout=300)
        print(out.stdout, out.stderr, file=sys.stderr)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("15/15 passed", out.stdout)

    # -- curl ------------------------------------------------------------------------------
    def test_curl_completion_equals_lorcserve_generate(self):
        code, text = curl(f"{self.a}/v1/completions", {
            "model": MODEL_NAME, "prompt": GREEDY_PROMPT, "max_tokens": 24, "temperature": 0})
        self.assertEqual(code, 200, text)
        body = json.loads(text)
        self.assertEqual(body["choices"][0]["text"], self.greedy_reference())
        self.assertEqual(body["usage"]["completion_tokens"], 24)
        self.assertIn("cached_tokens", body["usage"]["prompt_tokens_details"])

    def test_curl_batch_of_prompts(self):
        url = f"{self.a}/v1/completions"
        single = {}
        for p in (GREEDY_PROMPT, "A fool and his money"):
            code, text = curl(url, {"model": MODEL_NAME, "prompt": p, "max_tokens": 6,
                                    "temperature": 0})
            self.assertEqual(code, 200, text)
            single[p] = json.loads(text)
        batch = {"model": MODEL_NAME, "prompt": [GREEDY_PROMPT, "A fool and his money"],
                 "max_tokens": 6, "temperature": 0, "n": 2}
        code, text = curl(url, batch)
        self.assertEqual(code, 200, text)
        body = json.loads(text)
        # choices: prompt-major, n per prompt (OpenAI's order)
        self.assertEqual([c["index"] for c in body["choices"]], [0, 1, 2, 3])
        texts = [c["text"] for c in body["choices"]]
        a, b = (single[p]["choices"][0]["text"] for p in batch["prompt"])
        self.assertEqual(texts, [a, a, b, b])
        self.assertEqual(body["usage"]["prompt_tokens"],
                         sum(x["usage"]["prompt_tokens"] for x in single.values()))
        self.assertEqual(body["usage"]["completion_tokens"], 24)
        code, text = curl(url, dict(batch, stream=True), stream=True)
        self.assertEqual(code, 200, text)
        streamed = ["", "", "", ""]
        finished = set()
        for event in text.split("\n\n"):
            if event.startswith("data: {"):
                for c in json.loads(event[6:])["choices"]:
                    streamed[c["index"]] += c["text"]
                    if c["finish_reason"]:
                        finished.add(c["index"])
        self.assertEqual(streamed, texts)
        self.assertEqual(finished, {0, 1, 2, 3})
        # The coordinator's 400 about one prompt of a batch names that prompt.
        self.assert_error(*curl(url, dict(batch, prompt=["x", "word " * 5000])), 400,
                          "prompt[1]", r"^prompt\[1\]: prompt \(\d+ tokens\)")

    def test_curl_stream_sse(self):
        code, text = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}, stream=True)
        self.assertEqual(code, 200, text)
        events = [e for e in text.split("\n\n") if e.strip()]
        self.assertTrue(all(e.startswith("data: ") for e in events), events)
        self.assertEqual(events[-1], "data: [DONE]")
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 6)
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks[1:-1]][-1], "length")

    def test_curl_models_and_health(self):
        code, text = curl(f"{self.a}/v1/models")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(text)["data"][0]["id"], MODEL_NAME)
        self.assertEqual(curl(f"{self.a}/health")[0], 200)

    def assert_logprobs_close(self, got, want, msg):
        """Completion logprobs equal but for float rounding: the same tokens, offsets and top
        tokens, values within 1e-5. Two requests may run in batches of different shapes, and
        the CPU backend's GEMMs round differently by shape (2026-12-06: a streamed echo's prompt
        logprobs differed from the non-streamed ones in the 7th digit)."""
        self.assertEqual(sorted(got), sorted(want), msg)
        self.assertEqual(got["tokens"], want["tokens"], msg)
        self.assertEqual(got["text_offset"], want["text_offset"], msg)
        def close(a, b):
            return a is None and b is None or (a is not None and b is not None and abs(a - b) <= 1e-5)
        self.assertEqual(len(got["token_logprobs"]), len(want["token_logprobs"]), msg)
        for a, b in zip(got["token_logprobs"], want["token_logprobs"]):
            self.assertTrue(close(a, b), (a, b, msg))
        self.assertEqual(len(got["top_logprobs"]), len(want["top_logprobs"]), msg)
        for a, b in zip(got["top_logprobs"], want["top_logprobs"]):
            self.assertEqual(a is None, b is None, msg)
            if a is not None:
                self.assertEqual(sorted(a), sorted(b), msg)
                for key in a:
                    self.assertTrue(close(a[key], b[key]), (key, a[key], b[key], msg))

    def assert_error(self, code, text, status, param=None, message=None):
        self.assertEqual(code, status, text)
        err = json.loads(text)["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"})
        if param is not None:
            self.assertEqual(err["param"], param)
        if message is not None:
            self.assertRegex(err["message"], message)
        return err

    def wait_a_idle(self, what, timeout=20):
        """Waits for coordinator A to run and queue nothing (fails with `what` after timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
            if info.num_running == 0 and info.num_waiting == 0:
                return
            time.sleep(0.1)
        self.fail(f"{what}: running {info.num_running}, waiting {info.num_waiting}")

    def test_curl_400(self):
        url = f"{self.a}/v1/completions"
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "top_p": "high"}), 400,
                          "top_p", "top_p: must be a finite number")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "frobnicate": 1}),
                          400, "frobnicate", "not supported")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": ["a", 5]}), 400,
                          "prompt[1]")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": ["a", ""]}), 400,
                          "prompt[1]", "empty prompt")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}),
                          400, "max_tokens")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "max_tokens": 5000}),
                          400, None, "max_model_len")  # the coordinator's INVALID_ARGUMENT
        code, text = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", url, "-H", "Content-Type: application/json",
             "-d", "{not json"], capture_output=True, text=True).stdout.rpartition("\n")[::2]
        self.assert_error(int(text), code, 400, None, "not valid JSON")
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
            "messages[0].content[0]")
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]}
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", dict(
            chat, max_completion_tokens=2, max_tokens="x")), 400, "max_tokens")  # not ignored
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", dict(
            chat, max_completion_tokens=0)), 400, "max_completion_tokens")
        # Named as sent, not as the coordinator's "prompt + max_tokens (2147483647)".
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", dict(
            chat, max_completion_tokens=10**20)), 400, "max_completion_tokens",
            "100000000000000000000 exceeds")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "temperature": 1e308}),
                          400, "temperature", "float32")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "stop": ""}), 400,
                          "stop")
        self.assert_error(*curl(url, {"model": 5, "prompt": "x"}), 400, "model", "a string")
        # Not a batch of 5000 prompts: one prompt whose items are not token ids.
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": [5.0] * 5000}), 400,
                          "prompt", "must be a string or a list of token ids")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x",
                                      "logit_bias": {str(i): 1 for i in range(5000)}}), 400,
                          "logit_bias", "more than the vocabulary's")
        # A number written as a 401-digit integer: float() overflowed (a 500).
        big = "1" + "0" * 400
        for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                      "repetition_penalty"):
            out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", url, "-H",
                                  "Content-Type: application/json", "-d",
                                  '{"model": "%s", "prompt": "x", "%s": %s}' % (
                                      MODEL_NAME, field, big)], capture_output=True, text=True)
            text, _, code = out.stdout.rpartition("\n")
            self.assert_error(int(code), text, 400, field, "float32's range")
        # Over the model length, chat names `messages` (it has no `prompt`).
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi " * 5000}],
            "max_tokens": 1}), 400, "messages", r"^messages: prompt \(\d+ tokens\)")
        # Echoed client input is clipped: a 1 MB field name came back twice (message, param).
        code, text = curl(url, {"model": MODEL_NAME, "prompt": "x", "k" * (1 << 20): 1})
        err = self.assert_error(code, text, 400, None, "not supported")
        self.assertLess(len(text), 1000)
        self.assertEqual(err["param"], "k" * 99 + "\u2026")
        err = self.assert_error(*curl(url, {"model": "m" * (1 << 20), "prompt": "x"}), 404,
                                "model")
        self.assertLess(len(err["message"]), 300)

    def test_non_streaming_response_size_is_bounded(self):
        # 64 prompts x n=64 x 16 tokens x (1 + 20 logprobs): a 35 MB response whose building
        # took the gateway to 544 MiB (its container has 512) and held /health for seconds.
        url = f"{self.a}/v1/completions"
        big = {"model": MODEL_NAME, "prompt": [f"p{i}" for i in range(64)], "n": 64,
               "max_tokens": 16, "logprobs": 20}
        self.assert_error(*curl(url, big), 400, "logprobs",
                          "1376256 entries exceeds .* stream it")
        self.assert_error(*curl(url, dict(big, logprobs=None, max_tokens=512)), 400, "n")
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "n": 64,
            "max_tokens": 1000, "logprobs": True, "top_logprobs": 20}), 400, "top_logprobs")

    def test_oversized_prompts_are_refused_before_the_coordinator(self):
        url = f"{self.a}/v1/completions"
        # A token-id prompt longer than max_model_len (4096) is refused before its ids are
        # checked and converted: a 63 MB batch of them held the event loop for 23 s.
        batch = {"model": MODEL_NAME, "prompt": [[5] * 350000] * 20, "max_tokens": 1}
        path = os.path.join(self.tmp, "batch.json")
        with open(path, "w") as f:
            json.dump(batch, f)
        health = concurrent.futures.ThreadPoolExecutor(1)
        out = subprocess.Popen(["curl", "-s", "-w", "\n%{http_code}", url, "-H",
                                "Content-Type: application/json", "--data-binary", f"@{path}"],
                               stdout=subprocess.PIPE, text=True)
        probe = health.submit(curl, f"{self.a}/health")  # served beside it
        text, _, code = out.communicate(timeout=60)[0].rpartition("\n")
        self.assert_error(int(code), text, 400, "prompt[0]",
                          "350000 tokens leave no room .* 4096 tokens")
        self.assertEqual(probe.result(timeout=60)[0], 200)
        # Over the coordinator's per-prompt limit (ModelInfo.max_request_bytes, 4 MiB): 413
        # naming the prompt (the coordinator's 400 named no field).
        err = self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x" * (5 << 20)}),
                                413, "prompt", "accepts at most 4194304 bytes per prompt")
        self.assertEqual(err["code"], "request_too_large")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": ["y", "x" * (5 << 20)]}),
                          413, "prompt[1]")
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}),
            413, "messages")
        health.shutdown()

    def test_curl_404(self):
        err = self.assert_error(*curl(f"{self.a}/v1/completions",
                                      {"model": "gpt-4o", "prompt": "x"}), 404, "model")
        self.assertEqual(err["code"], "model_not_found")
        # Routing's own 404 / 405 in OpenAI's shape too (FastAPI answers {"detail": ...}).
        self.assert_error(*curl(f"{self.a}/v1/embeddings", {"input": "x"}), 404, None,
                          "Not Found")
        self.assert_error(*curl(f"{self.a}/v1/completions"), 405)

    def test_curl_401(self):
        url = f"{self.b}/v1/completions"
        body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
        self.assert_error(*curl(url, body), 401, None, "missing")
        self.assert_error(*curl(url, body, headers=("Authorization: Bearer nope",)), 401, None,
                          "invalid bearer token")
        self.assertEqual(curl(url, body, headers=(f"Authorization: Bearer {TOKEN}",))[0], 200)
        # Gateway B2 has no tokens of its own: the coordinator's UNAUTHENTICATED becomes 401.
        self.assert_error(*curl(f"{self.b2}/v1/completions", body,
                                headers=("Authorization: Bearer nope",)), 401, None,
                          "UNAUTHENTICATED")
        self.assertEqual(curl(f"{self.b2}/v1/completions", body,
                              headers=(f"Authorization: Bearer {TOKEN}",))[0], 200)
        # What B2 learnt from that authenticated call (the model's name and path, the fields'
        # validation) answers no caller the coordinator refuses: each is still a 401.
        self.assert_error(*curl(f"{self.b2}/v1/models"), 401, None, "UNAUTHENTICATED")
        self.assert_error(*curl(f"{self.b2}/v1/models/{MODEL_NAME}",
                                headers=("Authorization: Bearer nope",)), 401)
        for bad in ({"model": "zzz"}, {"max_tokens": -2}, {"frobnicate": 1}):
            err = self.assert_error(*curl(f"{self.b2}/v1/completions", dict(body, **bad)), 401)
            self.assertEqual(err["code"], "invalid_api_key")  # as the gateway's own check
        # Nor is its body read before the credential is checked (parsing one costs the loop).
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{self.b2}/v1/completions",
                              "-H", "Content-Type: application/json", "-d", "{not json"],
                             capture_output=True, text=True)
        self.assertEqual(out.stdout.rpartition("\n")[2], "401", out.stdout)
        # The same for closing a session (a tester got a 400 about the body without a token).
        for close in ({"session_id": 5}, {"session_id": "s"}):
            err = self.assert_error(*curl(f"{self.b2}/v1/sessions/close", close), 401)
            self.assertEqual(err["code"], "invalid_api_key")
        self.assertEqual(curl(f"{self.b2}/v1/models",
                              headers=(f"Authorization: Bearer {TOKEN}",))[0], 200)

    def test_curl_429_full_queue(self):
        body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 64, "ignore_eos": True}
        auth = (f"Authorization: Bearer {TOKEN}",)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: curl(f"{self.b}/v1/completions", body, auth),
                                    range(6)))
        codes = sorted(c for c, _ in results)
        self.assertIn(200, codes)
        self.assertIn(429, codes)
        for code, text in results:
            if code == 429:
                self.assertEqual(json.loads(text)["error"]["type"], "rate_limit_error")

    def test_curl_503_coordinator_unreachable(self):
        self.assert_error(*curl(f"{self.c}/v1/completions", {"model": MODEL_NAME,
                                                              "prompt": "x"}), 503)
        self.assert_error(*curl(f"{self.c}/health"), 503)

    def test_disconnect_cancels_the_grpc_call(self):
        proc = long_stream(self.a)
        info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
        self.assertGreaterEqual(info.num_running, 1)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        self.wait_a_idle("the disconnected stream still runs")
        # The same for a non-streaming request.
        proc = subprocess.Popen(
            ["curl", "-s", f"{self.a}/v1/completions", "-H", "Content-Type: application/json",
             "-d", json.dumps({"model": MODEL_NAME, "prompt": "y", "max_tokens": 3000,
                               "ignore_eos": True})], stdout=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline and \
                self.stub_a.ModelInfo(self.pb2.ModelInfoRequest()).num_running == 0:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
            if info.num_running == 0:
                break
            time.sleep(0.1)
        self.assertEqual(info.num_running, 0, "the disconnected request still runs")

    def test_disconnect_while_queued_cancels_the_grpc_call(self):
        # Coordinator B runs one sequence at a time: the second request waits in its queue.
        auth = (f"Authorization: Bearer {TOKEN}",)
        meta = (("authorization", f"Bearer {TOKEN}"),)
        stub_b = self.pb2_grpc.LorcServeStub(self.grpc.insecure_channel(self.coord_b))

        def info():
            return stub_b.ModelInfo(self.pb2.ModelInfoRequest(), metadata=meta)

        def start(prompt, stream, max_tokens):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": stream}
            return subprocess.Popen(
                ["curl", "-s", f"{self.b}/v1/completions", "-H", auth[0], "-H",
                 "Content-Type: application/json", "-d", json.dumps(body)],
                stdout=subprocess.DEVNULL)

        def wait_until(pred, what, timeout=30):
            deadline = time.time() + timeout
            while time.time() < deadline:
                i = info()
                if pred(i):
                    return i
                time.sleep(0.05)
            self.fail(f"{what}: running {i.num_running}, waiting {i.num_waiting}")

        # The first request runs for a minute or more (3,000 tokens on 2 loaded cores): longer
        # than the checks below, so the queue empties only by the cancellation.
        running = start("first", False, 3000)
        wait_until(lambda i: i.num_running == 1, "the first request never ran")
        for stream in (False, True):
            queued = start("second", stream, 16)
            wait_until(lambda i: i.num_waiting == 1, "the second request never queued")
            queued.kill()
            queued.wait()
            i = wait_until(lambda i: i.num_waiting == 0, "the disconnected request still waits",
                           timeout=10)
            self.assertEqual(i.num_running, 1)  # the first one goes on
        self.assertIsNone(running.poll(), "the first request ended: the check proves nothing")
        running.kill()
        running.wait()
        wait_until(lambda i: i.num_running == 0, "the first request still runs")

    def test_session_id_maps_to_the_store_session(self):
        messages = [{"role": "system", "content": "You are a dictionary. " * 8},
                    {"role": "user", "content": "Define the word"}]
        code, text = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": messages, "max_tokens": 20, "temperature": 0,
            "session_id": "conv-1"})
        self.assertEqual(code, 200, text)
        first = json.loads(text)
        info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
        self.assertGreaterEqual(info.prefix_cache.pinned_sessions, 1)
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And again"}]
        code, text = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": messages, "max_tokens": 4, "temperature": 0,
            "session_id": "conv-1"})
        self.assertEqual(code, 200, text)
        usage = json.loads(text)["usage"]
        # The first turn's prompt (full blocks of it) is not computed again.
        self.assertGreaterEqual(usage["prompt_tokens_details"]["cached_tokens"],
                                first["usage"]["prompt_tokens"] // 16 * 16 - 16)
        # Closed over HTTP (there was no way to, a tester found on 2026-12-05): then not found.
        closed_before = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest()).prefix_cache.sessions_closed
        code, text = curl(f"{self.a}/v1/sessions/close", {"session_id": "conv-1"})
        self.assertEqual(code, 200, text)
        self.assertEqual(json.loads(text), {"id": "conv-1", "object": "session", "closed": True})
        info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
        self.assertEqual(info.prefix_cache.sessions_closed, closed_before + 1)
        self.assert_error(*curl(f"{self.a}/v1/sessions/close", {"session_id": "conv-1"}), 404,
                          "session_id", "^session_id 'conv-1': no such session")
        self.assert_error(*curl(f"{self.a}/v1/sessions/close", {"cache_salt": "x"}), 400,
                          "session_id")
        self.assert_error(*curl(f"{self.a}/v1/sessions/close",
                                {"session_id": "conv-1", "ttl": 3}), 400, "ttl")

    def test_chat_bos_once(self):
        # The template emits <|begin_of_text|>; the coordinator's PromptToIds must not add one.
        from lorcserve_gateway import chat_template
        template = chat_template.load(ARGS.model, os.path.join(HERE, "llama3_chat_template.jinja"))
        messages = [{"role": "user", "content": "Hello"}]
        text = template.render(messages)
        self.assertTrue(text.startswith("<|begin_of_text|>"))
        ids = list(self.stub_a.Tokenize(self.pb2.TokenizeRequest(text=text)).ids)
        self.assertEqual(ids[0], 0)  # the fixture's BOS id: the spelled-out token is one id
        self.assertEqual(ids.count(0), 1)
        code, body = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": messages, "max_tokens": 1})
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["usage"]["prompt_tokens"], len(ids))
        # Tokenize with add_special_tokens gives exactly Generate's ids (here the template's BOS).
        special = self.stub_a.Tokenize(self.pb2.TokenizeRequest(text=text, add_special_tokens=True))
        self.assertEqual(list(special.ids), ids)

    def test_chat_without_max_tokens_fills_the_model_length(self):
        # OpenAI's default: the reply may run to the model length (4096), no further and no less.
        from lorcserve_gateway import chat_template
        template = chat_template.load(ARGS.model, os.path.join(HERE, "llama3_chat_template.jinja"))
        n, prompt_len = 4000, 0
        for _ in range(4):  # words until the prompt is 4090..4094 tokens
            messages = [{"role": "user", "content": "word " * n}]
            prompt_len = len(self.stub_a.Tokenize(self.pb2.TokenizeRequest(
                text=template.render(messages), add_special_tokens=True)).ids)
            if 4090 <= prompt_len <= 4094:
                break
            n += 4092 - prompt_len
        self.assertTrue(4090 <= prompt_len <= 4094, prompt_len)
        code, body = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": messages, "temperature": 0, "ignore_eos": True})
        self.assertEqual(code, 200, body)
        reply = json.loads(body)
        self.assertEqual(reply["usage"]["prompt_tokens"], prompt_len)
        self.assertEqual(reply["usage"]["completion_tokens"], 4096 - prompt_len)
        self.assertEqual(reply["choices"][0]["finish_reason"], "length")

    def test_chat_without_max_tokens_fits_the_kv_cache(self):
        # n completions of the model length need more blocks than coordinator A's cache has: the
        # default max_tokens shrinks to what fits (the coordinator refused the request as "can
        # never fit", found by a tester on 2026-12-05). EOS biased up: each ends at once.
        info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
        cache_tokens = info.kv_capacity_blocks * info.block_size
        n = cache_tokens // info.max_model_len + 2
        self.assertLessEqual(n, 64, "coordinator A's cache grew: pick a smaller test")
        code, body = curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "n": n,
            "temperature": 0, "logit_bias": {str(info.eos_token_ids[0]): 100}})
        self.assertEqual(code, 200, body)
        choices = json.loads(body)["choices"]
        self.assertEqual(len(choices), n)
        self.assertTrue(all(c["finish_reason"] == "stop" for c in choices), choices)

    def assert_start_fails(self, *flags):
        """Starts a gateway in front of coordinator A with `flags`: it must exit 2 without
        listening; returns its stderr."""
        out = subprocess.run(
            ["env", f"BUILD_DIR={ARGS.build_dir}", os.path.join(REPO, "scripts", "gateway.sh"),
             "--coordinator", self.coord_a, "--port", "0", *flags],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertNotIn("GATEWAY_LISTENING", out.stdout)
        return out.stderr

    def test_malformed_chat_template_stops_the_start(self):
        bad = os.path.join(self.tmp, "bad.jinja")
        with open(bad, "w") as f:
            f.write("{% for m in messages %}\n{{ m.content }\n")
        self.assertRegex(self.assert_start_fails("--chat-template", bad),
                         r"--chat-template .*bad\.jinja: line 2: ")
        # A --model-dir that is not there: logprobs and chat would silently lose the vocabulary.
        self.assertIn("--model-dir /nonexistent-dir: not a directory",
                      self.assert_start_fails("--model-dir", "/nonexistent-dir"))
        self.assertIn("--served-model-name: empty name",
                      self.assert_start_fails("--served-model-name", " "))

    def test_tls_to_the_coordinator(self):
        d = os.path.join(self.tmp, "tls")
        os.makedirs(d)
        ext = os.path.join(d, "ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in (
                ["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
                 "-subj", "/CN=gateway-test-ca"],
                ["req", *key, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"],
                ["x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "srv.crt", "-days", "1", "-extfile", ext],
                ["req", *key, "-keyout", "cli.key", "-out", "cli.csr", "-subj", "/CN=gateway"],
                ["x509", "-req", "-in", "cli.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "cli.crt", "-days", "1"]):
            subprocess.run(["openssl", *cmd], cwd=d, check=True, capture_output=True)
        _, coord = self.s.coordinator("coord_tls", "--tls-cert", os.path.join(d, "srv.crt"),
                                      "--tls-key", os.path.join(d, "srv.key"))
        url = "http://" + self.s.gateway("gw_tls", coord, "--tls-ca", os.path.join(d, "ca.crt"))
        wait_serving(url)
        code, text = curl(f"{url}/v1/completions", {"model": MODEL_NAME, "prompt": GREEDY_PROMPT,
                                                     "max_tokens": 4, "temperature": 0})
        self.assertEqual(code, 200, text)
        self.assertEqual(json.loads(text)["usage"]["completion_tokens"], 4)
        # Without the CA the gateway cannot reach it: 503.
        plain = "http://" + self.s.gateway("gw_plain", coord)
        self.assert_error(*curl(f"{plain}/v1/completions", {"model": MODEL_NAME,
                                                             "prompt": "x"}), 503)
        # A coordinator that requires a client certificate (--tls-client-ca): the gateway
        # presents --tls-cert / --tls-key; without them its handshake is refused (503).
        _, mtls = self.s.coordinator("coord_mtls", "--tls-cert", os.path.join(d, "srv.crt"),
                                     "--tls-key", os.path.join(d, "srv.key"),
                                     "--tls-client-ca", os.path.join(d, "ca.crt"))
        url = "http://" + self.s.gateway("gw_mtls", mtls, "--tls-ca", os.path.join(d, "ca.crt"),
                                         "--tls-cert", os.path.join(d, "cli.crt"),
                                         "--tls-key", os.path.join(d, "cli.key"))
        wait_serving(url)
        code, text = curl(f"{url}/v1/completions", {"model": MODEL_NAME, "prompt": "x",
                                                     "max_tokens": 2})
        self.assertEqual(code, 200, text)
        nocert = "http://" + self.s.gateway("gw_nocert", mtls, "--tls-ca",
                                            os.path.join(d, "ca.crt"))
        self.assert_error(*curl(f"{nocert}/v1/completions", {"model": MODEL_NAME,
                                                              "prompt": "x"}), 503, None,
                          "--tls-cert / --tls-key")
        self.assertIn("--tls-key", self.assert_start_fails(
            "--tls-ca", os.path.join(d, "ca.crt"), "--tls-cert", os.path.join(d, "cli.crt"),
            "--tls-key", os.path.join(d, "ca.crt")))  # a certificate, not a key
        # Another key, or an expired certificate: refused at start (each handshake would fail
        # with a message naming neither).
        self.assertIn("does not match the certificate in --tls-cert", self.assert_start_fails(
            "--tls-ca", os.path.join(d, "ca.crt"), "--tls-cert", os.path.join(d, "cli.crt"),
            "--tls-key", os.path.join(d, "srv.key")))
        expired_cert, expired_key = _expired_certificate(d)
        self.assertIn("the certificate expired on", self.assert_start_fails(
            "--tls-ca", os.path.join(d, "ca.crt"), "--tls-cert", expired_cert,
            "--tls-key", expired_key))

    def test_hostile_clients_leave_the_gateway_serving(self):
        # A burst of clients that hang up early (streamed, not, batches) beside malformed
        # bodies: each malformed one gets its 400 / 401 (none a 500 or a hang), no gRPC request
        # outlives its client, and the gateway logs no traceback.
        url = f"{self.a}/v1/completions"
        long = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}

        def hang_up(i):
            body = dict(long, stream=i % 2 == 0, prompt=["x", "y"] if i % 3 == 0 else "x")
            subprocess.run(["curl", "-sN", url, "--max-time", f"0.{2 + i % 7}", "-H",
                            "Content-Type: application/json", "-d", json.dumps(body)],
                           capture_output=True)

        raw = [('{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL_NAME, 400, None),
               ('{"model": "%s", "prompt": "\\ud800"}' % MODEL_NAME, 400, "prompt"),
               ('{"model": "%s", "prompt": "x", "n": 3000000000}' % MODEL_NAME, 400, "n"),
               ('{"model": "%s", "prompt": [5000000000]}' % MODEL_NAME, 400, "prompt[0]"),
               ('{"model": "%s", "prompt": %s}' % (MODEL_NAME, "[" * 5000 + "]" * 5000), 400,
                None)]

        def malformed(case):
            body, status, param = case
            out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", url, "--max-time", "20",
                                  "-H", "Content-Type: application/json", "--data-binary",
                                  body], capture_output=True, text=True)
            text, _, code = out.stdout.rpartition("\n")
            self.assert_error(int(code), text, status, param)

        host, port = self.a[len("http://"):].rsplit(":", 1)
        for _ in range(3):  # hung up while sending the body (Starlette's ClientDisconnect)
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            hangups = [pool.submit(hang_up, i) for i in range(16)]
            for f in [pool.submit(malformed, c) for c in raw]:
                f.result()
            # Not ASCII: gRPC refused the forwarded metadata and grpc.aio never ended the call.
            self.assert_error(*curl(url, dict(long, max_tokens=2), timeout=20,
                                    headers=("Authorization: Bearer caf\u00e9",)), 401)
            for f in hangups:
                f.result()
        self.wait_a_idle("a request outlived its client")
        self.assertEqual(curl(url, {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})[0], 200)
        with open(os.path.join(self.tmp, "gw_a.err")) as f:
            log = f.read()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("never retrieved", log)

    def test_sigterm_exits_after_the_drain_timeout(self):
        # uvicorn's graceful shutdown waited for a stream as long as it ran (or forever for a
        # request that never ends): --drain-timeout-s bounds it, and the coordinator's request
        # ends with the gateway. The streams it ends get the 503 error event and [DONE] (they
        # were cut mid-body, as a network failure would), a non-streaming request its 503, and
        # the gateway exits 0 without tracebacks. A second signal ends the drain at once.
        long = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
        for name, timeout_s, second in (("gw_drain", "1", False), ("gw_drain2", "60", True)):
            addr = self.s.gateway(name, self.coord_a, "--drain-timeout-s", timeout_s)
            gw = self.s.procs[-1]

            def request(stream):
                return subprocess.Popen(
                    ["curl", "-sN", "-w", "\n%{http_code}", f"http://{addr}/v1/completions",
                     "-H", "Content-Type: application/json", "-d",
                     json.dumps(dict(long, stream=stream))], stdout=subprocess.PIPE, text=True)

            stream, whole = request(True), request(False)
            stream.stdout.readline()  # the first chunk: the stream is running
            self.wait_a_running(2)
            start = time.time()
            gw.send_signal(signal.SIGTERM)
            if second:
                time.sleep(0.5)
                gw.send_signal(signal.SIGINT)
            self.assertEqual(gw.wait(timeout=15), 0)
            self.assertLess(time.time() - start, 10)
            events = [e for e in stream.communicate(timeout=10)[0].split("\n") if e]
            self.assertEqual(events[-1], "200")
            self.assertEqual(events[-2], "data: [DONE]", events[-4:])
            why = "a second termination signal" if second else r"the drain timeout \(1 s\)"
            self.assertRegex(events[-3], r'^data: \{"error": \{"message": "gateway shutting '
                                         r'down: ' + why)
            text, _, code = whole.communicate(timeout=10)[0].rpartition("\n")
            self.assert_error(int(code), text, 503, None, "gateway shutting down: " + why)
            self.wait_a_idle("the request outlived the gateway")
            with open(os.path.join(self.tmp, f"{name}.err")) as f:
                self.assertNotIn("Traceback", f.read())

    def wait_a_running(self, n, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stub_a.ModelInfo(self.pb2.ModelInfoRequest()).num_running >= n:
                return
            time.sleep(0.05)
        self.fail(f"coordinator A never ran {n} requests")

    def test_echo_gives_the_prompt_and_its_logprobs_first(self):
        # lm-evaluation-harness's loglikelihood request (its local-completions model): a token-id
        # prompt, echo, logprobs 1, max_tokens 1; it reads the continuation's logprobs off the
        # echoed prompt's positions. They must be the coordinator's prompt logprobs, position 0
        # null, then the generated token.
        url = f"{self.a}/v1/completions"
        ids = list(self.stub_a.Tokenize(self.pb2.TokenizeRequest(
            text=GREEDY_PROMPT, add_special_tokens=True)).ids)
        bos = "<|begin_of_text|>"
        want = []
        for msg in self.stub_a.Generate(self.pb2.GenerateRequest(
                token_ids=self.pb2.TokenIds(ids=ids),
                sampling=self.pb2.SamplingOptions(max_tokens=1, prompt_logprobs=1))):
            want += [lp.logprob for lp in msg.prompt_logprobs]
        self.assertEqual(len(want), len(ids) - 1)
        code, text = curl(url, {"model": MODEL_NAME, "prompt": GREEDY_PROMPT, "max_tokens": 1,
                                "temperature": 0})
        self.assertEqual(code, 200, text)
        generated = json.loads(text)["choices"][0]["text"]
        lm_eval = {"model": MODEL_NAME, "prompt": ids, "echo": True, "logprobs": 1,
                   "max_tokens": 1, "temperature": 0}
        code, text = curl(url, lm_eval)
        self.assertEqual(code, 200, text)
        body = json.loads(text)
        choice, lp = body["choices"][0], body["choices"][0]["logprobs"]
        self.assertEqual(choice["text"], bos + GREEDY_PROMPT + generated)  # ids decoded, BOS too
        self.assertEqual(len(lp["tokens"]), len(ids) + 1)
        self.assertEqual(lp["tokens"][0], bos)
        self.assertEqual((lp["token_logprobs"][0], lp["top_logprobs"][0]), (None, None))
        self.assertEqual(lp["token_logprobs"][1:len(ids)], want)
        for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:],
                                       lp["top_logprobs"][1:]):
            self.assertEqual(top[token], logprob)
        self.assertEqual(lp["text_offset"][:2], [0, len(bos)])
        self.assertEqual(lp["text_offset"], sorted(lp["text_offset"]))
        self.assertLessEqual(lp["text_offset"][-1], len(choice["text"]))
        self.assertEqual((body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]),
                         (len(ids), 1))

        # max_tokens 0: the prompt alone; a text prompt is echoed as sent, and the BOS the
        # coordinator adds to it takes no characters.
        only = {"model": MODEL_NAME, "prompt": GREEDY_PROMPT, "echo": True, "logprobs": 1,
                "max_tokens": 0}
        code, text = curl(url, only)
        self.assertEqual(code, 200, text)
        body = json.loads(text)
        choice, lp0 = body["choices"][0], body["choices"][0]["logprobs"]
        self.assertEqual((choice["text"], choice["finish_reason"], choice["stop_reason"]),
                         (GREEDY_PROMPT, "length", None))
        self.assertEqual(lp0["tokens"], lp["tokens"][:len(ids)])
        self.assertEqual(lp0["token_logprobs"][1:], want)
        self.assertEqual(lp0["text_offset"][:2], [0, 0])
        self.assertEqual(body["usage"]["completion_tokens"], 0)

        # Streamed: each choice's echo is its first chunk; the chunks add up to the response.
        for req in (dict(lm_eval, n=2, max_tokens=3), dict(only, logprobs=None, n=2),
                    dict(only, prompt=[GREEDY_PROMPT, "A fool"])):
            code, text = curl(url, req)
            self.assertEqual(code, 200, text)
            whole = json.loads(text)["choices"]
            code, text = curl(url, dict(req, stream=True), stream=True)
            self.assertEqual(code, 200, text)
            got = {}
            for event in text.split("\n\n"):
                if event.startswith("data: {"):
                    for c in json.loads(event[6:])["choices"]:
                        g = got.setdefault(c["index"], {"text": [], "lp": None, "finish": None})
                        g["text"].append(c["text"])
                        if c["logprobs"] is not None:
                            g["lp"] = {k: (g["lp"] or {}).get(k, []) + v
                                       for k, v in c["logprobs"].items()}
                        g["finish"] = c["finish_reason"] or g["finish"]
            self.assertEqual(sorted(got), [c["index"] for c in whole], req)
            for c in whole:
                g = got[c["index"]]
                self.assertEqual("".join(g["text"]), c["text"], req)
                if c["logprobs"] is None:
                    self.assertIsNone(g["lp"], req)
                else:
                    self.assert_logprobs_close(g["lp"], c["logprobs"], req)
                self.assertEqual(g["finish"], c["finish_reason"], req)
                prompt = req["prompt"] if isinstance(req["prompt"], str) else \
                    req["prompt"][c["index"]] if isinstance(req["prompt"][0], str) else None
                self.assertEqual(g["text"][0], prompt or bos + GREEDY_PROMPT, req)

        # The generated text's offsets count from the end of the echoed text, also when a
        # token-id prompt ends inside a character (its bytes echo as U+FFFD; offset 19 pointed
        # into them, a tester's ids).
        code, text = curl(url, {"model": MODEL_NAME, "prompt": [0, 163, 119, 258, 1048],
                                "echo": True, "logprobs": 0, "max_tokens": 3, "temperature": 0})
        self.assertEqual(code, 200, text)
        choice = json.loads(text)["choices"][0]
        code, dtext = curl(f"{self.a}/detokenize", {"tokens": [0, 163, 119, 258, 1048]})
        echoed = json.loads(dtext)["prompt"]
        self.assertTrue(choice["text"].startswith(echoed), (choice["text"], echoed))
        self.assertTrue(all(len(echoed) <= o <= len(choice["text"])
                            for o in choice["logprobs"]["text_offset"][5:]), choice)
        # A text the tokens do not spell (the one-BOS rule dropped the second BOS) is echoed as
        # its tokens' text, so that the offsets point at them.
        code, text = curl(url, {"model": MODEL_NAME, "prompt": bos + bos + "hi", "echo": True,
                                "logprobs": 0, "max_tokens": 0})
        self.assertEqual(code, 200, text)
        choice = json.loads(text)["choices"][0]
        self.assertEqual(choice["text"], bos + "hi")
        for token, o in zip(choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]):
            self.assertEqual(choice["text"][o:o + len(token)], token, choice)
        # Echoes count in the non-streaming bound, with logprobs or not (an echo without them
        # made a 537 MB response, a tester).
        long_ids = ids * 40
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": [long_ids] * 64, "echo": True,
                                      "max_tokens": 0, "n": 16}), 400, "echo",
                          "echoed prompts")

        # Still refused: max_tokens 0 without echo; echo on chat; a non-boolean echo.
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}),
                          400, "max_tokens")
        self.assert_error(*curl(url, {"model": MODEL_NAME, "prompt": "x", "echo": "yes"}),
                          400, "echo")
        self.assert_error(*curl(f"{self.a}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
            "echo": True}), 400, "echo")

    def test_tokenize_and_detokenize(self):
        # vLLM's /tokenize and /detokenize: the coordinator's ids (those a Generate of the text
        # sees), chat messages as the chat endpoint renders them, and the text back.
        def coordinator_ids(text, special):
            return list(self.stub_a.Tokenize(self.pb2.TokenizeRequest(
                text=text, add_special_tokens=special)).ids)
        ids = coordinator_ids(GREEDY_PROMPT, True)
        code, text = curl(f"{self.a}/tokenize", {"model": MODEL_NAME, "prompt": GREEDY_PROMPT})
        self.assertEqual(code, 200, text)
        info = self.stub_a.ModelInfo(self.pb2.ModelInfoRequest())
        self.assertEqual(json.loads(text), {"count": len(ids), "max_model_len": info.max_model_len,
                                            "tokens": ids, "token_strs": None})
        code, text = curl(f"{self.a}/tokenize", {"prompt": GREEDY_PROMPT, "add_special_tokens": False,
                                                 "return_token_strs": True})
        self.assertEqual(code, 200, text)
        body = json.loads(text)
        self.assertEqual(body["tokens"], coordinator_ids(GREEDY_PROMPT, False))
        # vLLM's: the vocabulary's pieces (byte-level: a leading space is 'Ġ').
        self.assertEqual("".join(body["token_strs"]).replace("\u0120", " "), GREEDY_PROMPT)
        self.assertTrue(any(t.startswith("\u0120") for t in body["token_strs"]), body)
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello there"}]}
        code, text = curl(f"{self.a}/tokenize", chat)
        self.assertEqual(code, 200, text)
        count = json.loads(text)["count"]
        code, text = curl(f"{self.a}/v1/chat/completions", dict(chat, max_tokens=1))
        self.assertEqual(code, 200, text)
        self.assertEqual(json.loads(text)["usage"]["prompt_tokens"], count)

        code, text = curl(f"{self.a}/detokenize", {"model": MODEL_NAME, "tokens": ids})
        self.assertEqual(code, 200, text)
        self.assertEqual(json.loads(text), {"prompt": "<|begin_of_text|>" + GREEDY_PROMPT})

        self.assert_error(*curl(f"{self.a}/tokenize", dict(chat, prompt="x")), 400, "prompt")
        self.assert_error(*curl(f"{self.a}/tokenize", {"prompt": 5}), 400, "prompt")
        self.assert_error(*curl(f"{self.a}/tokenize", {"model": "other", "prompt": "x"}), 404)
        self.assert_error(*curl(f"{self.a}/detokenize", {"tokens": [1, -1]}), 400, "tokens[1]")
        self.assert_error(*curl(f"{self.a}/detokenize", {"tokens": [info.vocab_size]}), 400,
                          "tokens[0]")
        self.assert_error(*curl(f"{self.a}/detokenize", {"tokens": "x"}), 400, "tokens")
        self.assert_error(*curl(f"{self.a}/detokenize", {}), 400, "tokens")
        self.assert_error(*curl(f"{self.a}/detokenize", {"tokens": [0] * ((1 << 20) + 1)}), 400,
                          "tokens", "more than the 1048576")
        code, text = curl(f"{self.a}/tokenize", {"prompt": "x" * (info.max_request_bytes + 1)})
        err = self.assert_error(code, text, 413, "prompt")
        self.assertEqual(err["code"], "request_too_large")

    def test_stop_reason_names_only_what_the_request_asked_to_stop_on(self):
        # vLLM: null at EOS (it was the EOS id), the token id for one of stop_token_ids.
        url = f"{self.a}/v1/completions"
        body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 5, "logit_bias": {"1": 100}}
        for stream in (False, True):
            for extra, reason in (({}, None), ({"stop_token_ids": [1]}, None),
                                  ({"logit_bias": {"5": 100}, "stop_token_ids": [5]}, 5)):
                code, text = curl(url, dict(body, stream=stream, **extra), stream=stream)
                self.assertEqual(code, 200, text)
                if stream:
                    chunks = [json.loads(e[6:]) for e in text.split("\n\n")
                              if e.startswith("data: {")]
                    choice = [c["choices"][0] for c in chunks][-1]
                else:
                    choice = json.loads(text)["choices"][0]
                self.assertEqual(choice["finish_reason"], "stop", text)
                self.assertEqual(choice["stop_reason"], reason, (stream, extra))

    def test_completion_logprobs_of_partial_characters_stay_distinct(self):
        # Byte-fallback tokens all read U+FFFD: top_logprobs (keyed by token) collapsed into one
        # entry holding another token's logprob, and text_offset ran past the text.
        body = {"model": MODEL_NAME, "prompt": "\u4e2d\u6587" * 11, "max_tokens": 3,
                "temperature": 0, "logprobs": 5}
        for stream in (False, True):
            code, text = curl(f"{self.a}/v1/completions", dict(body, stream=stream),
                              stream=stream)
            self.assertEqual(code, 200, text)
            if stream:
                choices = [json.loads(e[6:])["choices"][0] for e in text.split("\n\n")
                           if e.startswith("data: {")]
                out, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
                for c in choices:
                    out += c["text"]
                    for k in lp:
                        lp[k] += (c["logprobs"] or {}).get(k, [])
            else:
                choice = json.loads(text)["choices"][0]
                out, lp = choice["text"], choice["logprobs"]
            self.assertTrue(all(t.startswith("bytes:\\x") for t in lp["tokens"]), lp)
            for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"],
                                           lp["top_logprobs"]):
                self.assertEqual(len(top), 5, top)
                self.assertEqual(top[token], logprob)
            self.assertTrue(all(0 <= o <= len(out) for o in lp["text_offset"]),
                            (lp["text_offset"], out))

    def test_coordinator_stopped_hung_or_restarted(self):
        # A coordinator of its own on a fixed port, behind a gateway of its own.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]

        def coordinator(name, model):
            return self.s.start(name, [ARGS.lorcserve, "coordinator", "--model", model,
                                       "--listen", f"127.0.0.1:{port}", "--internal-listen",
                                       "127.0.0.1:0", "--local-workers", "1", "--backend",
                                       "cpu", "--threads", "1"], "LISTENING")[0]

        proc = coordinator("coord_restart", ARGS.model)
        url = "http://" + self.s.gateway("gw_restart", f"127.0.0.1:{port}")
        wait_serving(url)
        code, text = curl(f"{url}/v1/models")
        self.assertEqual(json.loads(text)["data"][0]["max_model_len"], 4096, text)
        # Hung (SIGSTOP): /health is 503 (what probes read as not ready), not 504.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            self.assert_error(*curl(f"{url}/health"), 503)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        wait_serving(url)
        # Stopped mid-stream: the error event says so (it blamed TLS alone).
        stream = long_stream(url)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        events = [e for e in stream.communicate(timeout=30)[0].split("\n") if e]
        self.assertEqual(events[-1], "data: [DONE]")
        error = json.loads(events[-2][6:])["error"]
        self.assertEqual(error["code"], 503, error)
        # gRPC words it "Socket closed" or "recvmsg:Connection reset by peer", by timing.
        self.assertRegex(error["message"], r"^(Socket closed|recvmsg:Connection reset by peer) "
                                           r"\(the coordinator stopped or closed the connection; "
                                           r".*TLS")
        # Back on the same address with another config (max_position_embeddings 1024): the
        # gateway follows it (it kept 4096 and refused chat requests without max_tokens).
        model = os.path.join(self.tmp, "restart_model", MODEL_NAME)
        os.makedirs(model)
        for f in os.listdir(ARGS.model):
            if f != "config.json":
                os.symlink(os.path.join(os.path.abspath(ARGS.model), f), os.path.join(model, f))
        with open(os.path.join(ARGS.model, "config.json")) as f:
            config = json.load(f)
        config["max_position_embeddings"] = 1024
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(config, f)
        coordinator("coord_restart2", model)
        wait_serving(url)
        code, text = curl(f"{url}/v1/models")
        card = json.loads(text)["data"][0]
        self.assertEqual((card["max_model_len"], card["root"]), (1024, model), text)
        code, text = curl(f"{url}/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0, "logit_bias": {"1": 100}})
        self.assertEqual(code, 200, text)

    def test_zz_503_draining(self):
        # Last (alphabetical order): ends coordinator B.
        self.coord_b_proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        auth = (f"Authorization: Bearer {TOKEN}",)
        statuses = set()
        while time.time() < deadline:
            code, text = curl(f"{self.b}/v1/completions",
                              {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}, auth)
            statuses.add(code)
            if code == 503:
                self.assert_error(code, text, 503)
                break
            time.sleep(0.1)
        self.assertIn(503, statuses)
        self.assertEqual(curl(f"{self.b}/health")[0], 503)


def _expired_certificate(d):
    """A self-signed EC certificate valid two days ago to yesterday, and its key: paths."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(d, "expired.crt"), os.path.join(d, "expired.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--lorcserve", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--build-dir", required=True)
    p.add_argument("--node-modules", required=True, help="npm ci'd node_modules of tests/gateway")
    ARGS, rest = p.parse_known_args()
    ARGS.build_dir = os.path.abspath(ARGS.build_dir)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()

"""Chat template rendering (gateway/lorcserve_gateway/chat_template.py) against the strings
Hugging Face's apply_chat_template produces for the same templates: the Llama-3 instruct and
Llama-2 chat templates as their tokenizer_config.json ship them (tests/gateway/*.jinja), and a
multi-line template whose output depends on trim_blocks / lstrip_blocks, tojson and
raise_exception. Run: /usr/bin/python3 tests/gateway/chat_template_test.py (ctest
GatewayChatTemplate)."""

import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "gateway"))

from lorcserve_gateway import chat_template  # noqa: E402
from lorcserve_gateway.chat_template import ChatTemplate, ChatTemplateError  # noqa: E402

LLAMA3 = open(os.path.join(HERE, "llama3_chat_template.jinja"), encoding="utf-8").read()
LLAMA2 = open(os.path.join(HERE, "llama2_chat_template.jinja"), encoding="utf-8").read()
L3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
L2_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": " Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

# Multi-line, as many recent templates are written: without trim_blocks / lstrip_blocks every
# block line would leave newlines and indentation in the prompt.
MULTILINE = """{{- bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}
{% endfor %}
{% if tools %}
<|tools|>{{ tools | tojson }}
{% endif %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


class Llama3Test(unittest.TestCase):
    def setUp(self):
        self.t = ChatTemplate(LLAMA3, L3_TOKENS)

    def test_system_multi_turn_generation_prompt(self):
        self.assertEqual(
            self.t.render(CONVERSATION, add_generation_prompt=True),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse."
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")

    def test_without_generation_prompt(self):
        self.assertEqual(
            self.t.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")

    def test_bos_emitted_once_by_the_template(self):
        text = self.t.render(CONVERSATION)
        self.assertEqual(text.count("<|begin_of_text|>"), 1)
        self.assertTrue(text.startswith("<|begin_of_text|>"))


class Llama2Test(unittest.TestCase):
    def setUp(self):
        self.t = ChatTemplate(LLAMA2, L2_TOKENS)

    def test_system_multi_turn(self):
        self.assertEqual(
            self.t.render(CONVERSATION),
            "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s>"
            "<s>[INST] What is 2+2? [/INST]")

    def test_no_system(self):
        self.assertEqual(self.t.render([{"role": "user", "content": "Hi"}]),
                         "<s>[INST] Hi [/INST]")

    def test_raise_exception_is_a_clear_error(self):
        with self.assertRaises(ChatTemplateError) as cm:
            self.t.render([{"role": "assistant", "content": "x"}])
        self.assertIn("Conversation roles must alternate", str(cm.exception))


class ConventionsTest(unittest.TestCase):
    def test_trim_and_lstrip_blocks(self):
        t = ChatTemplate(MULTILINE, {"bos_token": "<s>"})
        self.assertEqual(
            t.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True),
            "<s>\n<|user|>\nHi\n<|assistant|>\n")  # `{{- x }}` keeps its newline

    def test_tojson_keeps_non_ascii(self):
        t = ChatTemplate(MULTILINE, {"bos_token": ""})
        out = t.render([{"role": "user", "content": "x"}], add_generation_prompt=False,
                       tools=[{"name": "météo", "n": 1}])
        self.assertIn('<|tools|>[{"name": "météo", "n": 1}]', out)

    def test_unknown_role_raises(self):
        t = ChatTemplate(MULTILINE, {"bos_token": ""})
        with self.assertRaisesRegex(ChatTemplateError, "Unknown role: tool"):
            t.render([{"role": "tool", "content": "x"}])

    def test_strftime_now_and_loopcontrols_and_generation(self):
        t = ChatTemplate("{{ strftime_now('%Y') | length }}{% for m in messages %}"
                         "{% if loop.index0 == 1 %}{% break %}{% endif %}"
                         "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
        self.assertEqual(t.render([{"role": "user", "content": "a"},
                                   {"role": "user", "content": "b"}]), "4a")

    def test_sandbox_forbids_attribute_escape(self):
        t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
        with self.assertRaises(ChatTemplateError):
            t.render([{"role": "user", "content": "x"}])

    def test_immutable_sandbox_forbids_mutation(self):
        t = ChatTemplate("{{ messages.append(1) }}")
        with self.assertRaisesRegex(ChatTemplateError, "sandbox|unsafe|not safely"):
            t.render([{"role": "user", "content": "x"}])


class MalformedTest(unittest.TestCase):
    def test_syntax_error_names_origin_and_line(self):
        with self.assertRaises(ChatTemplateError) as cm:
            ChatTemplate("{% for m in messages %}\n{{ m.content }\n", origin="--chat-template x")
        msg = str(cm.exception)
        self.assertIn("--chat-template x", msg)
        self.assertRegex(msg, r"line \d+")

    def test_unclosed_block(self):
        with self.assertRaisesRegex(ChatTemplateError, "line .*(endfor|end of template)"):
            ChatTemplate("{% for m in messages %}{{ m.content }}")

    def test_empty(self):
        with self.assertRaisesRegex(ChatTemplateError, "empty chat template"):
            ChatTemplate("  ")


class LoadTest(unittest.TestCase):
    def write(self, d, name, obj):
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))

    def test_model_template_and_special_tokens(self):
        with tempfile.TemporaryDirectory() as d:
            self.write(d, "tokenizer_config.json", {
                "chat_template": LLAMA2, "bos_token": {"content": "<s>", "lstrip": False},
                "eos_token": "</s>"})
            t = chat_template.load(d)
            self.assertEqual(t.render([{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Yo"}]),
                             "<s>[INST] Hi [/INST] Yo </s>")

    def test_named_templates_take_default(self):
        with tempfile.TemporaryDirectory() as d:
            self.write(d, "tokenizer_config.json", {
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D{{ bos_token }}"}],
                "bos_token": "<s>"})
            self.assertEqual(chat_template.load(d).render([]), "D<s>")

    def test_override_file_and_none(self):
        with tempfile.TemporaryDirectory() as d:
            self.write(d, "tokenizer_config.json", {"bos_token": "<|begin_of_text|>"})
            self.assertIsNone(chat_template.load(d))
            self.write(d, "t.jinja", LLAMA3)
            t = chat_template.load(d, os.path.join(d, "t.jinja"))
            self.assertTrue(t.render([{"role": "user", "content": "x"}]).startswith(
                "<|begin_of_text|><|start_header_id|>user"))
            self.write(d, "bad.jinja", "{% if %}")
            with self.assertRaisesRegex(ChatTemplateError, "--chat-template .*bad.jinja: line 1"):
                chat_template.load(d, os.path.join(d, "bad.jinja"))
            with self.assertRaisesRegex(ChatTemplateError, "--chat-template .*missing.jinja"):
                chat_template.load(d, os.path.join(d, "missing.jinja"))


if __name__ == "__main__":
    unittest.main()

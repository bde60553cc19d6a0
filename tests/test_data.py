"""trb_jax.data: loading, student/teacher formatting, deterministic shuffling and resume.

Tokenizers are built offline: a byte-level BPE trained on a few strings (lossless, so decoded
ids must equal the exact prompt strings), saved with save_pretrained and reloaded through
AutoTokenizer; the teacher copy carries a Qwen-style chat template.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trb_jax import data as D
from trb_jax import rollout as R

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM = D.DEFAULT_SYSTEM_PROMPT


def _problems(n):
    return [f"What is {i} + {i}?" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM, "Please reason step by step.", "What is 1 + 1?", "system user assistant"]
    tok.train_from_iterator(corpus * 10, trainer)
    out = {}
    for name, template in (("student", None), ("teacher", QWEN_CHAT_TEMPLATE)):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>",
                                       additional_special_tokens=SPECIALS[1:])
        if template is not None:
            fast.chat_template = template
        path = tmp_path_factory.mktemp(name)
        fast.save_pretrained(path)
        out[name] = AutoTokenizer.from_pretrained(path)
    return out["student"], out["teacher"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stream(tokenizers_pair, n=10, batch_size=3, seed=0, state=D.StreamState()):
    s_tok, t_tok = tokenizers_pair
    problems = _problems(n)
    return D.PromptStream(problems, [str(2 * i) for i in range(n)], batch_size=batch_size,
                          student_tokenizer=s_tok, teacher_tokenizer=t_tok, seed=seed,
                          state=state)


# ------------------------------------------------------------------------------------ loading

def test_jsonl_custom_fields(tmp_path):
    rows = [{"question": p, "solution": i, "other": "x"} for i, p in enumerate(_problems(5))]
    cfg = D.DataConfig(source=_write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="question",
                       answer_field="solution")
    problems, answers = D.load_problems(cfg)
    assert problems == _problems(5)
    assert answers == ["0", "1", "2", "3", "4"]  # numbers become strings (math-verify input)


def test_parquet_custom_fields_and_max_examples(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": _problems(7), "gt": [f"a{i}" for i in range(7)],
                             "big": ["unused"] * 7}), path)
    cfg = D.DataConfig(source=str(path), prompt_field="prompt", answer_field="gt",
                       max_examples=4)
    problems, answers = D.load_problems(cfg)
    assert problems == _problems(4)
    assert answers == ["a0", "a1", "a2", "a3"]


def test_json_nested_field_and_no_answers(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": "..."}]}
            for p in _problems(3)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    cfg = D.DataConfig(source=str(path), prompt_field="conversations.0.value",
                       answer_field=None, max_examples=2)
    assert D.load_problems(cfg) == (_problems(2), [None, None])


def test_max_examples_larger_than_dataset(tmp_path):
    cfg = D.DataConfig(source=_write_jsonl(tmp_path / "d.jsonl",
                                           [{"problem": p, "answer": "1"} for p in _problems(3)]),
                       max_examples=25_600)
    assert len(D.load_problems(cfg)[0]) == 3


# ------------------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl"):
        D.load_problems(D.DataConfig(source=str(tmp_path / "nope.jsonl")))
    # A path with another suffix is still a (missing) path, not a hub id.
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.csv"):
        D.load_problems(D.DataConfig(source=str(tmp_path / "nope.csv")))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("problem,answer\nq,1\n")
    with pytest.raises(ValueError,
                       match=r"unsupported data file .*d\.csv.*\.jsonl, \.json, \.parquet"):
        D.load_problems(D.DataConfig(source=str(path)))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_missing_field_names_available_fields(tmp_path, suffix):
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(path, [{"question": "q", "answer": "1"}])
    else:
        pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), path)
    where = r":1 \(record 0\)" if suffix == "jsonl" else ""
    with pytest.raises(ValueError, match=rf"d\.{suffix}{where}: field 'problem' not found; "
                                         r"available fields: \['answer', 'question'\]"):
        D.load_problems(D.DataConfig(source=str(path)))


def test_missing_answer_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "final": "1"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1 \(record 0\): field 'answer' not found; "
                                         r"available fields: \['final', 'problem'\]"):
        D.load_problems(D.DataConfig(source=path))


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_empty_dataset(tmp_path, suffix):
    path = tmp_path / f"e.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.table({"problem": pa.array([], pa.string()),
                                 "answer": pa.array([], pa.string())}), path)
    else:
        path.write_text("" if suffix == "jsonl" else "[]")
    with pytest.raises(ValueError, match=r"dataset .*e\.%s' is empty" % suffix):
        D.load_problems(D.DataConfig(source=str(path)))


def test_non_string_problem(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "ok", "answer": 1},
                                               {"problem": None, "answer": 2}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 \(record 1\): field 'problem' must be a "
                                         r"non-empty string"):
        D.load_problems(D.DataConfig(source=path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Both libraries read HF_HUB_OFFLINE at import time, so the constants are patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^could not load dataset 'someone/no-such-dataset' "
                                         r"\(split 'train'\) from the Hugging Face hub: \S+"):
        D.load_problems(D.DataConfig(source="someone/no-such-dataset"))


def test_no_chat_template(tokenizers_pair):
    s_tok, _ = tokenizers_pair
    with pytest.raises(ValueError, match=r"has no chat template"):
        D.teacher_prompt("q", s_tok)
    with pytest.raises(ValueError, match=r"has no chat template"):
        next(D.PromptStream(["q"], None, batch_size=1, student_tokenizer=s_tok,
                            teacher_tokenizer=s_tok))


# --------------------------------------------------------------------------------- formatting

def test_student_and_teacher_formatting(tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    problem = "What is 1 + 1?"
    s_ids = D.encode_student(problem, s_tok)
    t_ids = D.encode_teacher(problem, t_tok)
    want_s = f"{SYSTEM}\n\n{problem}\n\n"
    want_t = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert D.student_prompt(problem) == want_s
    assert D.teacher_prompt(problem, t_tok) == want_t
    assert s_tok.decode(s_ids, skip_special_tokens=False) == want_s
    assert t_tok.decode(t_ids, skip_special_tokens=False) == want_t
    # Special tokens are single ids, and nothing (BOS/EOS) is added around the template.
    im_start = t_tok.convert_tokens_to_ids("<|im_start|>")
    assert t_ids[0] == im_start and t_ids.count(im_start) == 3
    assert s_tok.convert_tokens_to_ids("<|im_start|>") not in s_ids
    assert s_ids[-1] != s_tok.eos_token_id and t_ids[-1] != t_tok.eos_token_id


def test_formatting_without_system_prompt(tokenizers_pair):
    _, t_tok = tokenizers_pair
    assert D.student_prompt("Q?", "") == "Q?\n\n"
    assert D.teacher_prompt("Q?", t_tok, "") == ("<|im_start|>user\nQ?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")


def test_stream_examples_carry_problem_answer_and_ids(tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    for e in next(_stream(tokenizers_pair, n=6, batch_size=6)):
        assert e.problem == f"What is {e.index} + {e.index}?" and e.answer == str(2 * e.index)
        assert e.student_ids == D.encode_student(e.problem, s_tok)
        assert e.teacher_ids == D.encode_teacher(e.problem, t_tok)


def test_to_prompts_uses_pad_prompts(tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    batch = next(_stream(tokenizers_pair, n=5, batch_size=4))
    prompts = D.to_prompts(batch, s_tok.pad_token_id, t_tok.pad_token_id)
    assert isinstance(prompts, R.Prompts)
    for ids, mask, field, pad in ((prompts.student_ids_bt, prompts.student_mask_bt,
                                   "student_ids", s_tok.pad_token_id),
                                  (prompts.teacher_ids_bt, prompts.teacher_mask_bt,
                                   "teacher_ids", t_tok.pad_token_id)):
        want_ids, want_mask = R.pad_prompts([getattr(e, field) for e in batch], pad_id=pad)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        assert ids.dtype == np.int32 and ids.shape[1] in R.PROMPT_BUCKETS
        for row, e in zip(range(len(batch)), batch):  # left-padded: the prompt ends the row
            n = len(getattr(e, field))
            assert list(ids[row, -n:]) == getattr(e, field) and mask[row].sum() == n
    # The teacher's chat prompt is longer than the student's plain one: its own width.
    assert prompts.teacher_ids_bt.shape[1] >= prompts.student_ids_bt.shape[1]


def test_to_prompts_student_only(tokenizers_pair):
    s_tok, _ = tokenizers_pair
    stream = D.PromptStream(_problems(3), None, batch_size=2, student_tokenizer=s_tok)
    prompts = D.to_prompts(next(stream), s_tok.pad_token_id)
    assert prompts.teacher_ids_bt is None and prompts.student_ids_bt.shape[0] == 2


# ------------------------------------------------------------------------ shuffling and resume

def _indices(stream, num_batches):
    return [[e.index for e in next(stream)] for _ in range(num_batches)]


def test_shuffle_is_deterministic_and_seeded(tokenizers_pair):
    a = _indices(_stream(tokenizers_pair, seed=7), 6)
    assert a == _indices(_stream(tokenizers_pair, seed=7), 6)
    assert a != _indices(_stream(tokenizers_pair, seed=8), 6)
    # The order is exactly numpy's PCG64 permutation for (seed, epoch), epochs concatenated.
    flat = sum(a, [])
    want = np.concatenate([np.random.Generator(np.random.PCG64([7, e])).permutation(10)
                           for e in range(2)])
    assert flat == list(want[:18])


def test_every_example_once_per_epoch_and_epochs_reshuffle():
    n, seed = 23, 3
    state, flat = D.StreamState(), []
    for _ in range(3 * n // 4):  # batches of 4 cross epoch boundaries
        idx, state = D.take_indices(state, 4, n, seed)
        assert len(idx) == 4
        flat.extend(idx.tolist())
    epochs = [flat[k * n:(k + 1) * n] for k in range(3)]
    for ep in epochs[:len(flat) // n]:
        assert sorted(ep) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation each epoch
    assert epochs[1] == D.epoch_permutation(n, seed, 1).tolist()
    assert state == D.StreamState(len(flat) // n, len(flat) % n)


def test_resume_equivalence(tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    uninterrupted = _stream(tokenizers_pair, n=10, batch_size=3, seed=5)
    reference = [next(uninterrupted) for _ in range(6)]

    run = _stream(tokenizers_pair, n=10, batch_size=3, seed=5)
    for _ in range(3):
        next(run)
    saved = json.loads(json.dumps(run.state_dict()))  # serialisable: plain ints
    assert saved == {"epoch": 0, "offset": 9, "seed": 5, "num_examples": 10}
    resumed = D.PromptStream.from_state_dict(
        saved, _problems(10), [str(2 * i) for i in range(10)], batch_size=3,
        student_tokenizer=s_tok, teacher_tokenizer=t_tok, seed=5)
    # The 4th batch crosses into epoch 1 (reshuffled); later batches follow identically.
    assert [next(resumed) for _ in range(3)] == reference[3:]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_make_stream_resume_and_mismatch(tmp_path, tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    cfg = D.DataConfig(source=_write_jsonl(tmp_path / "d.jsonl",
                                           [{"problem": p, "answer": "0"} for p in _problems(8)]),
                       shuffle_seed=11)
    a = D.make_stream(cfg, s_tok, t_tok, batch_size=2)
    first = [next(a) for _ in range(5)]
    b = D.make_stream(cfg, s_tok, t_tok, batch_size=2, state={"epoch": 0, "offset": 4,
                                                               "seed": 11, "num_examples": 8})
    assert [next(b) for _ in range(3)] == first[2:]
    with pytest.raises(ValueError, match=r"cannot resume: saved seed 12 != this stream's 11"):
        D.make_stream(cfg, s_tok, t_tok, batch_size=2,
                      state={"epoch": 0, "offset": 0, "seed": 12, "num_examples": 8})
    with pytest.raises(ValueError, match=r"cannot resume: saved num_examples 9"):
        b.load_state_dict({"epoch": 0, "offset": 0, "seed": 11, "num_examples": 9})


# ------------------------------------------------------------------- bad records, named

def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"problem": "ok", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte b'\\xe9' at "
                                          r"column 17\); save the file as UTF-8$"):
        D.load_problems(D.DataConfig(source=str(path)))


def test_non_utf8_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"problem": "ok", "answer": "1"},\n{"problem": "\xff", "answer": "2"}\n]')
    with pytest.raises(D.DataError, match=r"d\.json:3: not UTF-8 text \(byte b'\\xff'"):
        D.load_problems(D.DataConfig(source=str(path)))


def test_null_answer_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"},
                                               {"problem": "b", "answer": None}])
    with pytest.raises(D.DataError, match=r"d\.jsonl:2 \(record 1\): field 'answer' is null"):
        D.load_problems(D.DataConfig(source=path))
    with pytest.raises(D.DataError, match=r"e\.jsonl:1 \(record 0\): field 'answer' must be a "
                                          r"string or a number, got list"):
        D.load_problems(D.DataConfig(source=_write_jsonl(tmp_path / "e.jsonl",
                                                         [{"problem": "a", "answer": [1]}])))


def _long_data(tmp_path):
    rows = [{"problem": p, "answer": "0"} for p in _problems(4)]
    rows[2]["problem"] = "What is " + " + ".join(["1"] * 40) + "?"
    return D.DataConfig(source=_write_jsonl(tmp_path / "d.jsonl", rows))


def test_overlong_prompts_drop_truncate_error(tmp_path, tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    cfg = _long_data(tmp_path)
    width = max(len(D.encode_teacher(p, t_tok)) for p in _problems(4))
    where = f"{cfg.source}:3 (record 2)"

    stream = D.make_stream(cfg, s_tok, t_tok, batch_size=3, max_length=width)  # default: drop
    assert cfg.overlong == "drop" and len(stream) == 3
    assert stream.report == {"records": 4, "max_length": width, "overlong": "drop",
                             "dropped": [where], "truncated": []}
    assert sorted(e.problem for e in next(stream)) == sorted(_problems(4)[:2] + _problems(4)[3:])
    assert stream.where == [f"{cfg.source}:{i} (record {i - 1})" for i in (1, 2, 4)]

    import dataclasses
    cut = D.make_stream(dataclasses.replace(cfg, overlong="truncate"), s_tok, t_tok,
                        batch_size=4, max_length=width)
    assert len(cut) == 4 and cut.report["truncated"] == [where]
    long = cut.example(2)
    assert len(long.teacher_ids) == width and len(long.student_ids) <= width
    # the end is kept: the generation prompt the teacher continues from
    assert long.teacher_ids == D.encode_teacher(long.problem, t_tok)[-width:]

    with pytest.raises(D.DataError, match=rf"^1 prompt\(s\) longer than rollout.prompt_length="
                                          rf"{width}: .*d\.jsonl:3 \(record 2\): \d+ tokens "
                                          r"\(data.overlong='error'"):
        D.make_stream(dataclasses.replace(cfg, overlong="error"), s_tok, t_tok, batch_size=2,
                      max_length=width)


def test_upfront_tokens_equal_per_batch_tokens(tmp_path, tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    cfg = D.DataConfig(source=_write_jsonl(tmp_path / "d.jsonl",
                                           [{"problem": p, "answer": "0"} for p in _problems(6)]))
    lazy = D.PromptStream(*D.load_problems(cfg), batch_size=4, student_tokenizer=s_tok,
                          teacher_tokenizer=t_tok)
    eager = D.make_stream(cfg, s_tok, t_tok, batch_size=4)
    assert eager.encoded is not None
    for _ in range(3):
        assert next(eager) == next(lazy)

"""trb_jax.toy.tokenizer: HF loading, round trip, EOS ids, chat template, data-module prompts."""

import pytest
import transformers

from trb_jax import data
from trb_jax.toy import tasks, tokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tokenizer.save_tokenizers(root / "student", root / "teacher")
    return (transformers.AutoTokenizer.from_pretrained(str(root / "student")),
            transformers.AutoTokenizer.from_pretrained(str(root / "teacher")))


def test_small_shared_vocabulary(toks):
    student, teacher = toks
    assert len(student) == len(teacher) == len(tokenizer.vocabulary()) < 128
    assert student.get_vocab() == teacher.get_vocab()
    assert [student.convert_tokens_to_ids(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2]


def test_eos_ids_differ(toks):
    student, teacher = toks
    assert student.eos_token == "<|endoftext|>" and teacher.eos_token == "<|im_end|>"
    assert student.eos_token_id != teacher.eos_token_id
    assert student.pad_token_id == teacher.pad_token_id == student.eos_token_id


def test_round_trip_of_every_toy_string(toks):
    student, teacher = toks
    for t in tasks.generate(tasks.TaskConfig(noise=0.3), 50, seed=0):
        for text in (t.problem, t.solution, data.student_prompt(t.problem, tokenizer.SYSTEM_PROMPT),
                     data.teacher_prompt(t.problem, teacher, tokenizer.SYSTEM_PROMPT)):
            ids = teacher(text, add_special_tokens=False)["input_ids"]
            assert student(text, add_special_tokens=False)["input_ids"] == ids
            assert teacher.decode(ids) == text
    # Numbers are split into digits; words carry their leading space.
    pieces = teacher.convert_ids_to_tokens(teacher("Ann has 12 pens.")["input_ids"])
    assert pieces == ["Ann", " has", " 1", "2", " pens", "."]


def test_unknown_text_is_an_error(toks):
    with pytest.raises(Exception):
        toks[0]("Zed has 4 pens.")


def test_chat_template(toks):
    student, teacher = toks
    prompt = data.teacher_prompt("Ann has 2 pens. How many pens now?", teacher, "Put the answer.")
    assert prompt == ("<|im_start|>system\nPut the answer.<|im_end|>\n"
                      "<|im_start|>user\nAnn has 2 pens. How many pens now?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    no_system = data.teacher_prompt("Ann has 2 pens.", teacher, "")
    assert no_system == "<|im_start|>user\nAnn has 2 pens.<|im_end|>\n<|im_start|>assistant\n"
    ids = teacher(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == teacher.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(teacher.eos_token_id) == 2  # <|im_end|> is one special token
    with pytest.raises(ValueError, match="no chat template"):
        data.teacher_prompt("Ann has 2 pens.", student)  # the Base copy has none
    # The toy world has no system prompt: the Base prompt is the problem and a blank line.
    assert tokenizer.SYSTEM_PROMPT == ""
    assert data.student_prompt("Ann has 2 pens.", tokenizer.SYSTEM_PROMPT) == "Ann has 2 pens.\n\n"
    assert data.student_prompt("Ann has 2 pens.", "Put the answer in \\boxed{}.") == (
        "Put the answer in \\boxed{}.\n\nAnn has 2 pens.\n\n")

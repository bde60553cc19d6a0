"""Evaluation: samples independent of batching, pass@1 / pass@k from the graded matrix."""

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from trb_jax import evaluation, rewards, smoke
from trb_jax.blending import EosMap
from trb_jax.models import checkpoint
from trb_jax.rollout import RolloutSpec


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    world = smoke.make_smoke_world(tmp_path_factory.mktemp("smoke"), n_train=4, n_test=5)
    model = checkpoint.from_pretrained(world / "student")
    tok = AutoTokenizer.from_pretrained(world / "student")
    problems = [r["problem"] for r in smoke.tasks.read_jsonl(world / "test.jsonl")]
    answers = [r["answer"] for r in smoke.tasks.read_jsonl(world / "test.jsonl")]
    return model, tok, problems, answers


class ParityGrader:
    """Deterministic stand-in for the math-verify pool: 1.0 for responses of even length."""

    def __init__(self):
        self.calls = []

    def grade_batch(self, texts, golds, timeout_s=5.0):
        self.calls.append((list(texts), list(golds)))
        return np.array([float(len(t) % 2 == 0) for t in texts], np.float32)


def test_samples_do_not_depend_on_the_batch_size(student):
    model, tok, problems, _ = student
    eos = EosMap.from_ids([tok.eos_token_id], [tok.eos_token_id])
    spec = RolloutSpec(behavior="student", max_new_tokens=6, eos=eos,
                       student_eos_id=tok.eos_token_id, teacher_eos_id=tok.eos_token_id)
    ids = [tok(p)["input_ids"] for p in problems]
    a = evaluation.sample_responses(model.params, model.config, ids, num_samples=3, spec=spec,
                                    rng=jax.random.key(1), pad_id=0, batch_size=4)
    b = evaluation.sample_responses(model.params, model.config, ids, num_samples=3, spec=spec,
                                    rng=jax.random.key(1), pad_id=0, batch_size=15)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (5, 3, 6)
    # samples of one problem differ (distinct row keys), at least somewhere
    assert any(not np.array_equal(a[0][p, 0], a[0][p, 1]) for p in range(5))


def test_pass_at_k_from_the_graded_matrix(student):
    model, tok, problems, answers = student
    grader = ParityGrader()
    eos = EosMap.from_ids([tok.eos_token_id], [2])
    res = evaluation.evaluate_dataset(
        "toy", problems, answers, params=model.params, config=model.config, tokenizer=tok,
        eos=eos, student_eos_id=tok.eos_token_id, grader=grader, rng=jax.random.key(0),
        num_samples=4, max_new_tokens=6, ks=(1, 2, 4), batch_size=8, system_prompt="")
    texts, golds = grader.calls[0]
    assert golds == [a for a in answers for _ in range(4)]
    correct = np.array([len(t) % 2 == 0 for t in texts], float).reshape(5, 4)
    np.testing.assert_array_equal(res.correct_pn, correct)
    assert res.metrics["pass@1"] == pytest.approx(correct.mean())
    for k in (2, 4):
        expected = np.mean([rewards.pass_at_k(4, int(c), k) for c in correct.sum(1)])
        assert res.metrics[f"pass@{k}"] == pytest.approx(expected)
    assert res.metrics["num_samples"] == 4 and res.metrics["num_problems"] == 5


def test_gold_answers_after_a_marker(tmp_path):
    from trb_jax.config import EvalDataset

    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "q1", "answer": "work\\n#### 72"}\n')
    ds = EvalDataset(name="gsm8k", source=str(path), prompt_field="question",
                     answer_after="####")
    assert evaluation.load_eval_problems(ds) == (["q1"], ["72"])


def test_only_the_student_is_evaluated(student):
    model, tok, problems, _ = student
    eos = EosMap.from_ids([tok.eos_token_id], [tok.eos_token_id])
    spec = RolloutSpec(behavior="trb", max_new_tokens=4, eos=eos, student_eos_id=0,
                       teacher_eos_id=0)
    with pytest.raises(ValueError, match="evaluation samples the student"):
        evaluation.sample_responses(model.params, model.config, [[1, 2]], num_samples=1,
                                    spec=spec, rng=jax.random.key(0), pad_id=0)

import json
import random

from longshort.config import DemoTaskConfig
from longshort.io import dumps_jsonl
from models.protocol import parse_response
from tasks.demo import demo_rows, generate_splits, sample_problem
from tasks.synthesize import synthesize_demo


def test_teacher_is_deterministic(tmp_path):
    cfg = DemoTaskConfig(n_train=50, n_heldout=20, seed=3)
    a = synthesize_demo(cfg, tmp_path / "a")
    b = synthesize_demo(cfg, tmp_path / "b")
    assert (tmp_path / "a/train.jsonl").read_bytes() == (tmp_path / "b/train.jsonl").read_bytes()
    assert a.train_md5 == b.train_md5 and a.heldout_md5 == b.heldout_md5
    c = synthesize_demo(cfg.model_copy(update={"seed": 4}), tmp_path / "c")
    assert c.train_md5 != a.train_md5


def test_splits_are_disjoint_and_heldout_is_stable():
    cfg = DemoTaskConfig(n_train=400, n_heldout=100)
    train, heldout = generate_splits(cfg)
    assert len(set(train)) == 400 and len(set(heldout)) == 100
    assert not set(train) & set(heldout)
    _, heldout_more = generate_splits(cfg.model_copy(update={"n_train": 600}))
    assert heldout_more == heldout


def test_values_stay_in_range_and_answer_is_the_chain():
    cfg = DemoTaskConfig()
    rng = random.Random(0)
    for _ in range(200):
        p = sample_problem(rng, cfg)
        assert all(0 <= v <= cfg.max_value for v in p.values())
        assert cfg.min_ops <= len(p.ops) <= cfg.max_ops
        value = p.start  # the ops applied in order, by hand
        for sign, operand in p.ops:
            assert sign in "+-" and 1 <= operand <= cfg.max_operand
            value = value + operand if sign == "+" else value - operand
        assert p.answer == value == p.values()[-1]
        assert p.text.startswith(f"Start with {p.start}. Then (1) ")


def test_trace_has_the_r1_style_and_hidden_labels():
    train, _ = demo_rows(DemoTaskConfig(n_train=200, n_heldout=10, detour_rate=0.5))
    kinds = set()
    for row in train:
        thinking, final = parse_response(row["response"])
        assert final.answer == row["answer"]
        thoughts = row["thoughts"]
        assert "\n\n".join(t["text"] for t in thoughts) == thinking
        assert [t["essential"] for t in thoughts].count(True) == 1
        essential = next(t for t in thoughts if t["essential"])
        assert essential["text"].endswith(f"= {row['answer']}.")
        kinds |= {t["kind"] for t in thoughts}
        assert "Wait, let me double-check" in thinking
    assert kinds == {"restate", "plan", "detour", "compute", "verify", "backcheck", "conclude"}
    # the essential computation is a small part of the trace: the rest is what Long⊗Short can shorten
    share = sum(len(next(t for t in r["thoughts"] if t["essential"])["text"]) for r in train) / sum(
        len(r["response"]) for r in train
    )
    assert share < 0.2


def test_jsonl_is_canonical(tmp_path):
    # one row per line; keys sorted; ", " and ": " separators; non-ASCII written as is
    assert dumps_jsonl([{"b": [1, 2], "a": "Long⊗Short"}, {}]) == '{"a": "Long⊗Short", "b": [1, 2]}\n{}\n'
    cfg = DemoTaskConfig(n_train=5, n_heldout=1)
    train, heldout = demo_rows(cfg)
    text = dumps_jsonl(train)
    lines = text.splitlines(keepends=True)
    assert len(lines) == 5 and all(line.endswith("}\n") and line.count("\n") == 1 for line in lines)
    rows = [json.loads(line) for line in lines]
    assert rows == train  # round-trips
    for line, row in zip(lines, rows):
        assert list(row) == sorted(row)  # written in key order
        assert line == json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(", ", ": ")) + "\n"
    assert dumps_jsonl(rows) == text
    # and the synthesized split files are exactly that text, so their md5 is a digest of the rows
    synthesize_demo(cfg, tmp_path)
    assert (tmp_path / "train.jsonl").read_text(encoding="utf-8") == text
    assert (tmp_path / "heldout.jsonl").read_text(encoding="utf-8") == dumps_jsonl(heldout)

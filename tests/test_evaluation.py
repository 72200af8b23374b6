"""Evaluation metrics against hand-computed values (arithmetic in the comments).

The VQA expectations follow GT-Vision-Lab/VQA vqaEval.py (master, a013f00) as it runs, quirks
included; the NLVR2 ones follow lil-lab/nlvr nlvr2/eval/metrics.py.
"""
import numpy as np
import pytest
import torch

from pixelbert.evaluation import (_CONTRACTIONS, normalize_answer, nlvr2_accuracy, nlvr2_statement_prior,
                                  retrieval_recall, vqa_accuracy)

# ------------------------------------------------------------------ normalize_answer


@pytest.mark.parametrize("raw, expected", [
    ("yes", "yes"),
    ("yes.", "yes"),            # '.' not followed by a digit is deleted
    ("Yes!", "yes"),            # '!' -> ' ' (no space next to it), then lower-case + split
    ("yes ?", "yes"),           # '?' next to a space is deleted
    ("3.5", "3.5"),             # '.' followed by a digit stays
    (".5", ".5"),               # ... whatever precedes it (the look-behind is a typo)
    ("5.", "5"),                # trailing '.' goes
    ("3.5.", "3.5"),            # first '.' is before '5', the second is not
    ("e.g.", "eg"),             # periods are deleted, not replaced with spaces
    ("a dog", "dog"),           # articles a / an / the are dropped
    ("An Apple", "apple"),
    ("the", ""),                # an answer that is only an article becomes empty
    ("A", ""),
    ("two", "2"),               # number words zero..ten become digits
    ("Two Dogs", "2 dogs"),
    ("ten", "10"),
    ("eleven", "eleven"),       # ... only up to ten
    ("none", "0"),              # 'none' is a number word too
    ("dont", "don't"),          # contractions, after lower-casing
    ("Dont", "don't"),
    ("isnt", "isn't"),
    ("couldn'tve", "couldn't've"),  # "'" is not punctuation in the master script
    ("don't", "don't"),
    ("Im", "im"),               # the map's "Im" key is dead: words are lower-cased first
    ("somebody'd", "somebodyd"),  # the map's backwards entry
    ("1,000", "1000"),          # digit,digit: every punctuation mark is deleted
    ("1,2/3", "123"),           # ... including the '/' elsewhere in the text
    ("red, white", "red white"),  # ',' next to a space: deleted
    ("red,white", "red white"),   # ',' between letters: replaced with a space
    ("1/2", "1 2"),             # '/' between digits: a space (no comma rule without a comma)
    ("t-shirt", "t shirt"),
    ("3:30", "3:30"),           # ':' is not in the master punctuation list
    ("  The   Cat \n", "cat"),  # whitespace collapses
    ("x/y\t/", "xy"),           # '\t' -> ' ' first, so '/' is next to a space: deleted
    ("x/y\r/", "x y"),          # '\r' is not replaced: '/' -> ' ', then split
    ("3.-5 -", "3.5"),          # '-' deleted first (space next to one), then "3.5" keeps its '.'
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_deletion_stops_after_32():
    # The script passes re.UNICODE (== 32) as `count` of Pattern.sub: 33 periods -> 1 left.
    assert normalize_answer("." * 33) == "."
    assert normalize_answer("." * 32) == ""
    assert normalize_answer("ok" + "." * 40) == "ok" + "." * 8


def test_contraction_map_is_complete():
    assert len(_CONTRACTIONS) == 120  # the official map has 120 entries


# ------------------------------------------------------------------ vqa_accuracy


def _ann(qid, answers, answer_type="other", question_type="what is"):
    assert len(answers) == 10
    return {"question_id": qid, "image_id": 1, "answer_type": answer_type,
            "question_type": question_type, "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)]}


def _one(pred, answers):
    return vqa_accuracy({1: pred}, [_ann(1, answers)])["overall"]


@pytest.mark.parametrize("n_match, expected", [
    # n humans gave the answer; ten leave-one-out subsets, min(1, matches among other nine / 3).
    (0, 0.0),    # all ten subsets have 0 matches
    (1, 30.0),   # 1 subset drops the match: 0; 9 subsets: 1/3 -> (9/3)/10 = 0.3
    (2, 60.0),   # 2 subsets: 1/3; 8 subsets: 2/3 -> (2/3 + 16/3)/10 = 18/30 = 0.6 (not 0.67)
    (3, 90.0),   # 3 subsets: 2/3; 7 subsets: 3/3 -> (2 + 7)/10 = 0.9
    (4, 100.0),  # 4 subsets: 3/3; 6 subsets: 4/3 -> capped at 1 -> 1.0
    (10, 100.0),
])
def test_vqa_accuracy_human_agreement(n_match, expected):
    answers = ["cat"] * n_match + ["dog", "cow", "owl"] * 4
    answers = answers[:10]
    assert _one("cat", answers) == pytest.approx(expected)
    assert round(_one("cat", answers), 2) == expected  # the script's 2-decimal rounding


def test_vqa_processing_when_humans_disagree():
    # Answers differ, so ground truth and prediction are both processed.
    answers = ["two"] * 2 + ["2"] * 2 + ["Two."] + ["three"] * 5
    # GT -> "2" x5, "3" x5; "TWO!" -> "2": 5 matches, every subset >= 4 -> 100
    assert _one("TWO!", answers) == pytest.approx(100.0)
    # "the cat" x2 + "Cat" -> "cat" x3 (+ 7 "dog"); "a cat." -> "cat": 3 matches -> 90
    assert _one("a cat.", ["the cat", "the cat", "Cat"] + ["dog"] * 7) == pytest.approx(90.0)
    # 9 "the cat" + 1 "cat": processed, all ten "cat" -> 100
    assert _one("The Cat!", ["the cat"] * 9 + ["cat"]) == pytest.approx(100.0)


def test_vqa_no_processing_when_humans_agree():
    # All ten identical: only '\n'/'\t'/strip is applied; the match is exact and case-sensitive.
    assert _one("Yes", ["yes"] * 10) == 0.0
    assert _one("yes.", ["yes"] * 10) == 0.0
    assert _one(" yes\n", ["yes"] * 10) == 100.0  # the whitespace step always runs
    assert _one("cat", ["the cat"] * 10) == 0.0    # articles are not dropped either
    assert _one("the cat", ["the cat"] * 10) == 100.0
    # "identical" is judged after the whitespace step: still no processing here.
    assert _one("Yes", ["yes"] * 9 + ["yes\t"]) == 0.0


def test_vqa_duplicate_answer_records():
    # The script leaves out records by dict equality: two identical records (same answer_id)
    # are both dropped when either is left out. Records 0 and 1 are the same dict "cat"/id 1;
    # 8 distinct "dog" records. Prediction "cat": leaving out record 0 or 1 leaves 0 matches ->
    # 0; each of the 8 others leaves 2 -> 2/3. (0 + 0 + 8 * 2/3) / 10 = 16/30 = 53.33%.
    ann = _ann(1, ["cat", "cat"] + ["dog"] * 8)
    ann["answers"][1]["answer_id"] = 1
    assert vqa_accuracy({1: "cat"}, [ann])["overall"] == pytest.approx(1600 / 30)


def test_vqa_per_type_averages_and_rounding():
    anns = [
        _ann(1, ["yes"] * 10, "yes/no", "is the"),                # "yes" -> 1.0
        _ann(2, ["no"] * 10, "yes/no", "is the"),                 # "yes" -> 0.0
        _ann(3, ["2"] * 2 + ["3"] * 8, "number", "how many"),     # "two" -> 2 -> 0.6
        _ann(4, ["red"] * 3 + ["blue"] * 7, "other", "what color"),  # "red" -> 0.9
        _ann(5, ["red"] * 1 + ["blue"] * 9, "other", "is the"),   # "red" -> 0.3
    ]
    preds = {1: "yes", 2: "yes", 3: "two", 4: "red", 5: "red"}
    out = vqa_accuracy(preds, anns)
    # overall (1 + 0 + 0.6 + 0.9 + 0.3) / 5 = 2.8 / 5 = 56%
    assert out["overall"] == pytest.approx(56.0)
    # yes/no (1 + 0) / 2 = 50; number 60; other (0.9 + 0.3) / 2 = 60
    assert out["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 60.0})
    # "is the": (1 + 0 + 0.3) / 3 = 43.333..; "how many" 60; "what color" 90
    assert out["per_question_type"] == pytest.approx(
        {"is the": 130 / 3, "how many": 60.0, "what color": 90.0})
    assert round(out["per_question_type"]["is the"], 2) == 43.33
    assert round(out["overall"], 2) == 56.0


def test_vqa_does_not_modify_annotations():
    anns = [_ann(1, ["The Cat"] * 5 + ["dog"] * 5)]
    vqa_accuracy({1: "cat"}, anns)
    assert anns[0]["answers"][0]["answer"] == "The Cat"


def test_vqa_prediction_coverage_errors():
    anns = [_ann(q, ["yes"] * 10) for q in (7, 8, 9)]
    with pytest.raises(ValueError, match=r"2 of 3 .*question_id 8"):
        vqa_accuracy({7: "yes"}, anns)
    with pytest.raises(ValueError, match=r"1 predictions .*question_id 10"):
        vqa_accuracy({7: "yes", 8: "yes", 9: "yes", 10: "no"}, anns)
    with pytest.raises(ValueError, match="more than once"):
        vqa_accuracy({7: "yes"}, anns[:1] * 2)
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy({}, [])
    with pytest.raises(TypeError, match="not str"):
        vqa_accuracy({7: 1, 8: "yes", 9: "yes"}, anns)


# ------------------------------------------------------------------ retrieval_recall

# 3 images, 7 texts; texts 0-1 belong to image 0, 2-4 to image 1, 5-6 to image 2.
SCORES = [
    # t0   t1   t2   t3   t4   t5   t6
    [0.9, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1],  # image 0
    [0.5, 0.5, 0.3, 0.7, 0.2, 0.6, 0.1],  # image 1
    [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.1],  # image 2
]
IMG_OF_TEXT = [0, 0, 1, 1, 1, 2, 2]
EXPECTED = {
    # i2t rank = wrong texts scoring >= the image's best own score:
    #   image 0: best 0.9 (t0); t2 ties at 0.9 -> rank 1
    #   image 1: best 0.7 (t3); no wrong text >= 0.7 -> rank 0
    #   image 2: best 0.8 (t5); t0..t4 all tie at 0.8 -> rank 5
    # ranks [1, 0, 5]: R@1 1/3, R@5 2/3, R@10 3/3
    "i2t_r1": 100 / 3, "i2t_r5": 200 / 3, "i2t_r10": 100.0,
    # t2i rank = wrong images scoring >= the text's image's score (column-wise):
    #   t0 (img 0, 0.9): 0.5, 0.8 -> 0     t1 (img 0, 0.2): 0.5, 0.8 -> 2
    #   t2 (img 1, 0.3): 0.9, 0.8 -> 2     t3 (img 1, 0.7): 0.8 -> 1
    #   t4 (img 1, 0.2): 0.8 -> 1          t5 (img 2, 0.8): 0.1, 0.6 -> 0
    #   t6 (img 2, 0.1): 0.1, 0.1 both tie -> 2
    # ranks [0, 2, 2, 1, 1, 0, 2]: R@1 2/7, R@5 and R@10 7/7
    "t2i_r1": 200 / 7, "t2i_r5": 100.0, "t2i_r10": 100.0,
    # mean (100/3 + 200/3 + 100 + 200/7 + 100 + 100) / 6 = (400 + 200/7) / 6 = 500/7
    "mean": 500 / 7,
}


@pytest.mark.parametrize("convert", [
    lambda s, g: (torch.tensor(s), torch.tensor(g)),
    lambda s, g: (torch.tensor(s, dtype=torch.bfloat16), torch.tensor(g)),
    lambda s, g: (np.array(s, dtype=np.float64), np.array(g, dtype=np.int32)),
], ids=["torch-fp32", "torch-bf16", "numpy"])
def test_retrieval_hand_computed(convert):
    out = retrieval_recall(*convert(SCORES, IMG_OF_TEXT))
    assert out == pytest.approx(EXPECTED)


def test_retrieval_independent_of_order():
    # Ties are pessimistic whatever the order: permuting images and texts changes nothing.
    rng = np.random.default_rng(0)
    s, g = np.array(SCORES), np.array(IMG_OF_TEXT)
    for _ in range(5):
        pi, pt = rng.permutation(3), rng.permutation(7)
        inverse = np.argsort(pi)
        assert retrieval_recall(s[pi][:, pt], inverse[g[pt]]) == pytest.approx(EXPECTED)


def test_retrieval_perfect_reversed_and_ladder():
    n = 12
    assert all(v == 100.0 for v in retrieval_recall(torch.eye(n), torch.arange(n)).values())
    # Reversed: each ground truth (0) is below all 11 wrong items (1): rank 11 -> 0 everywhere.
    assert all(v == 0.0 for v in retrieval_recall(1 - torch.eye(n), torch.arange(n)).values())
    # Constant scores: everything ties, so everything is ranked last -> 0 (pessimistic).
    assert all(v == 0.0 for v in retrieval_recall(torch.ones(n, n), torch.arange(n)).values())
    # Ladder: s[i, t] = 1 if t < i, 0 on the diagonal, -1 if t > i.
    # Image i: i wrong texts score 1 > 0 -> rank i: ranks 0..11 -> R@1 1/12, R@5 5/12, R@10 10/12.
    # Text t: images i > t score 1 -> rank 11 - t: ranks 11..0 -> the same recalls.
    i, t = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ladder = (t < i).float() - (t > i).float()
    r = {1: 100 / 12, 5: 500 / 12, 10: 1000 / 12}
    expected = {f"{d}_r{k}": v for d in ("i2t", "t2i") for k, v in r.items()}
    expected["mean"] = (1 + 5 + 10) * 100 / 36  # (2 * 1600/12) / 6
    assert retrieval_recall(ladder, torch.arange(n)) == pytest.approx(expected)
    # Same ladder with the -1s raised to 0 (ties with the ground truth): image i now has all
    # 11 wrong texts >= 0 -> rank 11; text t: images i != t all >= 0 -> rank 11. All 0.
    assert all(v == 0.0 for v in retrieval_recall(ladder.clamp(min=0), torch.arange(n)).values())


def test_retrieval_matches_argsort_without_ties():
    # Without ties the rule equals the ALBEF/UNITER argsort ranks (best ground-truth text).
    rng = np.random.default_rng(1)
    num_images, num_texts = 20, 57
    s = rng.standard_normal((num_images, num_texts))
    g = np.concatenate([np.arange(num_images), rng.integers(0, num_images, num_texts - num_images)])
    i2t = [min(int(np.where(np.argsort(-s[i]) == t)[0][0]) for t in np.flatnonzero(g == i))
           for i in range(num_images)]
    t2i = [int(np.where(np.argsort(-s[:, t]) == g[t])[0][0]) for t in range(num_texts)]
    out = retrieval_recall(s, g)
    for k in (1, 5, 10):
        assert out[f"i2t_r{k}"] == pytest.approx(100 * np.mean(np.array(i2t) < k))
        assert out[f"t2i_r{k}"] == pytest.approx(100 * np.mean(np.array(t2i) < k))


def test_retrieval_chunked_rows(monkeypatch):
    import pixelbert.evaluation as evaluation
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 8)  # 1 image row per chunk
    assert retrieval_recall(SCORES, IMG_OF_TEXT) == pytest.approx(EXPECTED)


@pytest.mark.parametrize("scores, img_of_text, message", [
    (torch.zeros(3), [0, 1, 2], "matrix"),
    (torch.zeros(2, 3), [0, 1], r"shape \(3,\)"),
    (torch.zeros(2, 3), [0, 1, 2], r"\[0, 2\)"),
    (torch.zeros(2, 3), [0, -1, 1], r"\[0, 2\)"),
    (torch.zeros(2, 3), [0.0, 1.0, 1.0], "integer"),
    (torch.zeros(3, 3), [0, 0, 1], "no text .*image 2"),
    (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), [0, 1], "NaN"),
])
def test_retrieval_validation(scores, img_of_text, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(scores, torch.tensor(img_of_text))


# ------------------------------------------------------------------ nlvr2_accuracy


def test_nlvr2_accuracy_and_consistency():
    labels = {"dev-1-0-0": True, "dev-1-1-0": False,   # sentence (dev, 1, 0): 2 pairs
              "dev-1-2-1": True, "dev-1-3-1": True,    # sentence (dev, 1, 1): 2 pairs
              "dev-2-0-0": False,                      # sentence (dev, 2, 0)
              "dev-2-1-1": True}                       # sentence (dev, 2, 1)
    preds = {"dev-1-0-0": True, "dev-1-1-0": False,    # both right -> consistent
             "dev-1-2-1": False, "dev-1-3-1": True,    # one wrong -> not consistent
             "dev-2-0-0": False,                       # right -> consistent
             "dev-2-1-1": False}                       # wrong -> not consistent
    out = nlvr2_accuracy(preds, labels)
    assert out["accuracy"] == pytest.approx(400 / 6)    # 4 of 6 right
    assert out["consistency"] == pytest.approx(50.0)    # 2 of 4 sentences all right


def test_nlvr2_errors():
    labels = {"dev-1-0-0": True, "dev-1-1-0": False}
    with pytest.raises(ValueError, match=r"1 of 2 .*dev-1-1-0"):
        nlvr2_accuracy({"dev-1-0-0": True}, labels)
    with pytest.raises(ValueError, match="without a label"):
        nlvr2_accuracy({**{k: True for k in labels}, "dev-9-0-0": True}, labels)
    with pytest.raises(ValueError, match="not of the form"):
        nlvr2_accuracy({"dev-1-0": True}, {"dev-1-0": True})
    with pytest.raises(TypeError, match="bool"):
        nlvr2_accuracy({"dev-1-0-0": "True", "dev-1-1-0": False}, labels)


def test_nlvr2_statement_prior():
    train = [("The left image contains a red circle", True), ("the left image  contains a red circle", True),
             ("the left image contains a red circle", False),          # 2 True : 1 False -> True
             ("neither image contains a blue shape", False),           # -> False
             ("both images contain a bar", True), ("both images contain a bar", False),  # tie
             ("one of the images contains exactly two shapes", False)]  # overall: 3 True, 4 False
    sentences = {"dev-0-0-0": "the left image contains a red circle", "dev-0-1-0": "neither image contains a blue shape",
                 "dev-1-0-0": "both images contain a bar", "dev-1-1-0": "a sentence never seen in training"}
    labels = {"dev-0-0-0": True, "dev-0-1-0": True, "dev-1-0-0": False, "dev-1-1-0": True}
    # guesses: True (right), False (wrong), tie -> overall majority False (right), unseen -> False (wrong)
    assert nlvr2_statement_prior(train, labels, sentences) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="empty"):
        nlvr2_statement_prior(train, {}, sentences)

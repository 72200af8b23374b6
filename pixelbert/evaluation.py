"""Downstream evaluation metrics: VQA v2 accuracy, image-text retrieval recall, NLVR2 accuracy.

Each metric reproduces the official evaluation, quirks included, so numbers printed here can be
compared with published ones:

- VQA v2: `PythonEvaluationTools/vqaEvaluation/vqaEval.py` and `PythonHelperTools/vqaTools/vqa.py`
  of GT-Vision-Lab/VQA at master (commit a013f00); the rules are re-implemented, not copied.
- Retrieval: the image-to-text / text-to-image recall@K of ViLBERT, UNITER and ALBEF, with an
  explicit, order-independent rule for tied scores (see `retrieval_recall`).
- NLVR2: `nlvr2/eval/metrics.py` of lil-lab/nlvr (accuracy and consistency).
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# VQA answer processing (the official vqaEval.py `processPunctuation` + `processDigitArticle`)
# ---------------------------------------------------------------------------------------------

# The official contraction map, entry for entry (120 keys), typos included:
# - "somebody'd" maps *to* "somebodyd" (backwards compared with every other entry);
# - "Id've", "I'dve", "Im" and "Ive" can never match: words are lower-cased before the lookup.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# Number words up to ten become digits. Quirk: "none" becomes "0" too, so "none", "zero" and
# "0" are one answer. (GT-Vision-Lab/VQA issue #7 is this map hurting "none" in the older
# script, which gave the ground truth no number-word step; master processes both sides alike.)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The master-branch punctuation list. Quirk: the apostrophe, ':' and '.' are not in it (older
# versions of the script had "'" and ':'), so "don't" and "3:30" survive; '.' has its own rule.
_PUNCTUATION = frozenset(';/[]"{}()=+\\_-><@`,?!')
# A comma between two digits anywhere in the text ("1,000") switches every punctuation mark of
# the text from "replace with a space" to "delete". re.ASCII: the official script runs on
# Python 2, where `\d` without re.UNICODE matches only 0-9 even in unicode strings.
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d", re.ASCII)
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a typo for a look-behind: as
# written it is a look-ahead for the text "<=digit", which a '.' never starts with, so it is
# always true. What remains: delete every '.' that is not followed by a digit ("3.5" and ".5"
# keep theirs, "5." and "e.g." lose theirs), whatever precedes it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)", re.ASCII)
# Quirk: the script passes `re.UNICODE` as the third positional argument of `Pattern.sub`,
# which is `count`, not `flags`: at most re.UNICODE == 32 periods are deleted per answer.
_MAX_PERIODS_DELETED = int(re.UNICODE)


def _strip_whitespace(text: str) -> str:
    """The script's first step: '\\n' and '\\t' become spaces, then surrounding whitespace goes.

    Only '\\n' and '\\t' are replaced (not '\\r' or others); this matters because the
    punctuation rule below looks for marks next to a literal space.
    """
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    Per punctuation mark present in the text: deleted if the *input* text has that mark next to
    a space (either side) or has a digit-comma-digit anywhere, else replaced with a space. The
    test is on the input, not on the text as already edited for earlier marks, so the marks are
    independent and one `str.translate` does them all. The period rule runs afterwards, on the
    edited text.
    """
    present = _PUNCTUATION.intersection(text)
    if present:
        if _COMMA_BETWEEN_DIGITS.search(text):
            table = {ord(p): None for p in present}
        else:
            table = {ord(p): None if (p + " " in text or " " + p in text) else " "
                     for p in present}
        text = text.translate(table)
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_MAX_PERIODS_DELETED)


def _process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, split on whitespace, number words to
    digits, drop articles, then expand contractions word by word, and join with single spaces.
    (The script's `manualMap.setdefault` also grows its map with every word it sees; that has
    no effect on results and is not reproduced.)"""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


@functools.lru_cache(maxsize=1 << 20)
def normalize_answer(answer: str) -> str:
    """A VQA answer as the official VQA v2 evaluation processes it, when it processes it.

    Whitespace step, then `processPunctuation`, then `processDigitArticle`, in the script's
    order. In `vqa_accuracy` this is applied to the prediction and the ten ground-truth answers
    only when the ground-truth answers are not all identical (see there); use it to build an
    answer vocabulary. Cached: VQA answers repeat heavily.
    """
    return _process_digit_article(_process_punctuation(_strip_whitespace(answer)))


# ---------------------------------------------------------------------------------------------
# VQA v2 accuracy
# ---------------------------------------------------------------------------------------------

def _question_accuracy(prediction: str, answers: Sequence[Mapping[str, Any]]) -> float:
    """Official accuracy of one question in [0, 1], computed in the script's float order."""
    # Whitespace step on the ground truth and the prediction, always.
    gt = [_strip_whitespace(a["answer"]) for a in answers]
    pred = _strip_whitespace(prediction)
    # Quirk (on purpose, per the VQA authors in GT-Vision-Lab/VQA issue #14: to leave OCR-like
    # answers alone): punctuation/number/article/case processing of BOTH the ground truth and
    # the prediction happens only when the ten stripped answers are not all the same. When the
    # humans agree, the match is exact and case-sensitive: "Yes" or "yes." against ten "yes"
    # scores 0.
    if len(set(gt)) > 1:
        gt = [normalize_answer(a) for a in gt]
        pred = normalize_answer(pred)
    # Leave-one-out: for each answer record d, count the matches among the records != d and
    # score min(1, matches / 3). Quirk: records are compared as whole dicts (with the processed
    # answer), so a record that appears twice (same answer, confidence and answer_id; never in
    # the released data, where answer_id is 1..10) removes both copies when left out.
    # Equal records have equal answers, hence: matches without d = all matches minus, when d's
    # answer matches, the number of records equal to d (1 when the answer_ids are distinct).
    matches = sum(g == pred for g in gt)
    answer_ids = [a.get("answer_id") for a in answers]
    if len(set(answer_ids)) == len(answer_ids):
        copies = [1] * len(gt)
    else:
        records = [tuple(sorted({**a, "answer": g}.items())) for a, g in zip(answers, gt)]
        count = Counter(records)
        copies = [count[r] for r in records]
    total = 0.0
    for n, g in zip(copies, gt):
        total += min(1, float(matches - (n if g == pred else 0)) / 3)
    return total / len(answers)


def _percent_of_mean(values: list[float]) -> float:
    # The script's expression, 100*float(sum(x))/len(x), so rounding to 2 decimals agrees.
    return 100 * float(sum(values)) / len(values)


def vqa_accuracy(predictions: Mapping[int, str], annotations: Sequence[Mapping[str, Any]]) -> dict:
    """Official VQA v2 accuracy, in percent and unrounded (the official script rounds to 2
    decimals at the end: `round(x, 2)` of these values gives its numbers).

    `annotations` is the `annotations` list of a VQA v2 annotation file; `predictions` maps every
    one of its question ids to an answer string. Like the official loader, predictions must
    cover exactly the annotated questions. Per question: mean over the ten leave-one-out subsets
    of min(1, matching answers among the other nine / 3); overall and per-type numbers are plain
    means over questions. The caller's annotations are not modified (the script edits its
    ground truth in place).

    Returns {"overall": float, "per_answer_type": {type: float},
    "per_question_type": {type: float}}.
    """
    if not annotations:
        raise ValueError("annotations is empty: there is no question to evaluate")
    question_ids = [ann["question_id"] for ann in annotations]
    if len(set(question_ids)) != len(question_ids):
        duplicate = next(q for q, n in Counter(question_ids).items() if n > 1)
        raise ValueError(f"annotations list question_id {duplicate!r} more than once")
    missing = [q for q in question_ids if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(question_ids)} annotated questions have no "
                         f"prediction (e.g. question_id {missing[0]!r}); the official evaluation "
                         "requires an answer for every question")
    known = set(question_ids)
    extra = [q for q in predictions if q not in known]
    if extra:
        raise ValueError(f"{len(extra)} predictions are for question ids not in the annotations "
                         f"(e.g. question_id {extra[0]!r})")

    overall: list[float] = []
    per_answer_type: dict[str, list[float]] = {}
    per_question_type: dict[str, list[float]] = {}
    for ann in annotations:  # annotation order, as the script sums in it
        prediction = predictions[ann["question_id"]]
        if not isinstance(prediction, str):
            raise TypeError(f"prediction for question_id {ann['question_id']!r} is "
                            f"{type(prediction).__name__}, not str")
        acc = _question_accuracy(prediction, ann["answers"])
        overall.append(acc)
        per_answer_type.setdefault(ann["answer_type"], []).append(acc)
        per_question_type.setdefault(ann["question_type"], []).append(acc)
    return {
        "overall": _percent_of_mean(overall),
        "per_answer_type": {k: _percent_of_mean(v) for k, v in per_answer_type.items()},
        "per_question_type": {k: _percent_of_mean(v) for k, v in per_question_type.items()},
    }


# ---------------------------------------------------------------------------------------------
# Image-text retrieval
# ---------------------------------------------------------------------------------------------

_RECALL_KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 24  # bound on the temporary boolean matrix of one comparison


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact: ties stay ties
        return x.numpy()
    return np.asarray(x)


def retrieval_recall(scores, img_of_text) -> dict:
    """Recall@1/5/10 of image-to-text and text-to-image retrieval, in percent.

    `scores[i, t]` is the score of image i with text t ([num_images, num_texts], torch or
    numpy); `img_of_text[t]` is the index of text t's image. Image-to-text: image i is ranked
    by its best-ranked ground-truth text (a hit at K when any of its texts is in the top K), as
    in ViLBERT/UNITER/ALBEF. Text-to-image: text t is ranked by its one image.

    Ties, pessimistic and order-independent: the 0-based rank of a ground truth with score s is
    the number of *wrong* candidates scoring >= s (wrong candidates strictly above, plus wrong
    candidates tied with it; the query's other ground-truth texts never count against it). For
    image-to-text this is applied to the image's best ground-truth score. A hit at K is
    rank < K. Without ties this equals the ALBEF/UNITER `np.argsort(score)[::-1]` rank exactly;
    with ties, those argsort/topk ranks depend on the order of the items (argsort's quicksort
    is not stable, topk's order is unspecified), while this rule is the worst case over all
    orders, so equal scores can never inflate recall (e.g. a constant score matrix gets 0, not
    whatever the sort happened to put first).

    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean"}, "mean"
    being the mean of the six.
    """
    s = _as_numpy(scores)
    gt_image = _as_numpy(img_of_text)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"scores must be a non-empty [num_images, num_texts] matrix, "
                         f"got shape {tuple(s.shape)}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    num_images, num_texts = s.shape
    if gt_image.shape != (num_texts,):
        raise ValueError(f"img_of_text must have shape ({num_texts},) to match scores "
                         f"{tuple(s.shape)}, got {tuple(gt_image.shape)}")
    if not np.issubdtype(gt_image.dtype, np.integer):
        raise ValueError(f"img_of_text must hold integer image indices, got dtype {gt_image.dtype}")
    if gt_image.min() < 0 or gt_image.max() >= num_images:
        raise ValueError(f"img_of_text values must be in [0, {num_images}), "
                         f"got range [{gt_image.min()}, {gt_image.max()}]")
    texts_per_image = np.bincount(gt_image, minlength=num_images)
    if (texts_per_image == 0).any():
        lonely = np.flatnonzero(texts_per_image == 0)
        raise ValueError(f"{lonely.size} image(s) have no text (e.g. image {lonely[0]}); "
                         "image-to-text recall is undefined for them")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")

    gt_image = gt_image.astype(np.int64)
    gt_score = s[gt_image, np.arange(num_texts)]  # score of each text with its own image
    best_gt = np.full(num_images, -np.inf, dtype=s.dtype)
    np.maximum.at(best_gt, gt_image, gt_score)
    # Own texts tied with the image's best one: counted by `>=` below but not wrong.
    own_at_best = np.bincount(gt_image, weights=gt_score == best_gt[gt_image],
                              minlength=num_images).astype(np.int64)

    i2t_rank = np.empty(num_images, dtype=np.int64)
    t2i_rank = np.full(num_texts, -1, dtype=np.int64)  # -1: the ground-truth image itself
    rows = max(1, _CHUNK_ELEMENTS // num_texts)
    for start in range(0, num_images, rows):
        block = s[start:start + rows]
        i2t_rank[start:start + rows] = (block >= best_gt[start:start + rows, None]).sum(1)
        t2i_rank += (block >= gt_score[None, :]).sum(0)
    i2t_rank -= own_at_best

    out = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in _RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * float((rank < k).sum()) / rank.size
    out["mean"] = sum(out.values()) / len(out)
    return out


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------

def _nlvr2_sentence_key(identifier: str) -> tuple[str, str, str]:
    """`split-set_id-pair_id-sentence_id` -> (split, set_id, sentence_id).

    The official metrics.py groups by the identifier with its pair_id field blanked: the same
    sentence (written for one eight-image set) is paired with several image pairs.
    """
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not of the form "
                         "split-set_id-pair_id-sentence_id")
    return parts[0], parts[1], parts[3]


def _check_bool(value, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def nlvr2_statement_prior(train: Iterable[tuple[str, bool]], labels: Mapping[str, bool],
                          sentences: Mapping[str, str]) -> float:
    """A blind NLVR2 baseline, in percent: each evaluation statement gets the majority label of
    the same sentence (lower-cased, whitespace collapsed) among the training statements, or the
    overall training majority for a sentence never seen there. What a model that reads the
    statement but not the images can reach."""
    norm = lambda text: " ".join(text.lower().split())  # noqa: E731
    votes: dict[str, list[int]] = {}
    overall = [0, 0]
    for text, label in train:
        votes.setdefault(norm(text), [0, 0])[int(label)] += 1
        overall[int(label)] += 1
    if not labels:
        raise ValueError("labels is empty: there is no example to evaluate")
    fallback = overall[1] > overall[0]
    correct = 0
    for identifier, label in labels.items():
        count = votes.get(norm(sentences[identifier]))
        guess = count[1] > count[0] if count and count[0] != count[1] else fallback
        correct += guess == label
    return 100.0 * correct / len(labels)


def nlvr2_accuracy(predictions: Mapping[str, bool], labels: Mapping[str, bool]) -> dict:
    """NLVR2 accuracy and consistency, in percent, as lil-lab/nlvr's `nlvr2/eval/metrics.py`.

    accuracy: correct predictions over all labelled identifiers. consistency: over unique
    sentences, i.e. identifiers grouped by (split, set_id, sentence_id) across their image
    pairs, the share whose predictions are all correct. Predictions must cover exactly the
    labelled identifiers (metrics.py stops on missing ones; the NLVR2 README says extra ones are
    an error too).

    Returns {"accuracy": float, "consistency": float}.
    """
    if not labels:
        raise ValueError("labels is empty: there is no example to evaluate")
    missing = [i for i in labels if i not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(labels)} labelled identifiers have no "
                         f"prediction (e.g. {missing[0]!r})")
    extra = [i for i in predictions if i not in labels]
    if extra:
        raise ValueError(f"{len(extra)} predictions are for identifiers without a label "
                         f"(e.g. {extra[0]!r})")
    correct = 0
    consistent: dict[tuple[str, str, str], bool] = {}
    for identifier, label in labels.items():
        key = _nlvr2_sentence_key(identifier)
        ok = (_check_bool(predictions[identifier], f"prediction for {identifier!r}")
              == _check_bool(label, f"label of {identifier!r}"))
        correct += ok
        consistent[key] = consistent.get(key, True) and ok
    return {"accuracy": 100.0 * correct / len(labels),
            "consistency": 100.0 * sum(consistent.values()) / len(consistent)}

"""pixelbert.predict: one request gives what evaluation computes for the same image and text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelbert import predict
from pixelbert.config import load_config
from pixelbert.data import synthetic
from pixelbert.data.skips import SkipCounter
from pixelbert.data.images import load_encoded
from pixelbert.data.tasks import AnswerVocabulary, TaskDataset
from pixelbert.data.tokenizer import read_vocab, run_tokenizer
from pixelbert.engine.data import ANSWERS_FILE
from pixelbert.engine.distributed import DistInfo
from pixelbert.engine.eval_setup import EvalSetup
from pixelbert.engine.evaluator import task_outputs
from pixelbert.engine.retrieval_eval import retrieval_scores
from pixelbert.engine.weights import load_weights
from pixelbert.model.tasks import build_model
from tests.helpers import eval_run


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 40, 3)
    return out


def ask(capsys, run: Path, *args: str, checkpoint: Path | None = None, config: Path | None = None) -> tuple[int, dict | str]:
    """predict's exit code and its reply (its error message when it fails)."""
    code = predict.main(["--config", str(config or run / "config.json"),
                         "--checkpoint", str(checkpoint or run / "weights.pt"), *args])
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else out.err


def evaluation(run: Path, *overrides: str, weights: Path | None = None):
    """The model and EvalSetup that `pixelbert.evaluate` builds for the run (one CPU rank)."""
    cfg = load_config(run / "config.json", ["data.num_workers=0", *overrides])
    answers = AnswerVocabulary.load(run / ANSWERS_FILE) if cfg.train.task == "vqa" else None
    model = build_model(cfg, len(answers.answers) if answers else None, backbone_weights=False)
    assert not load_weights(model, weights or run / "weights.pt").initialised
    tokenizer = run_tokenizer(cfg.data, run)
    return model.eval(), EvalSetup(cfg, tokenizer, DistInfo(0, 1, 0, torch.device("cpu")), answers)


def distinct_images(records, count: int) -> list:
    """The first record of each of the first `count` images (or image pairs)."""
    seen: dict = {}
    for r in records:
        seen.setdefault(r.images or r.image, r)
    return list(seen.values())[:count]


def test_vqa_scores_every_answer_as_evaluation_does(synth, tmp_path, capsys):
    run, val = eval_run(tmp_path, synth, "vqa")
    chosen = distinct_images(val, 3)
    model, setup = evaluation(run)
    dataset = TaskDataset("vqa", chosen, setup.tokenizer, setup.cfg.data, answers=setup.answers, replace_bad=False)
    with torch.no_grad():  # one evaluation batch of the three questions, images padded together
        logits = torch.cat([out for _, out in task_outputs(dataset, setup, SkipCounter(), model.logits)])
    for record, expected in zip(chosen, torch.sigmoid(logits)):
        code, reply = ask(capsys, run, "--image", record.image, "--text", record.text,
                          "--top", str(len(setup.answers.answers)))
        assert code == 0, reply
        scores = [a["score"] for a in reply["answers"]]
        assert scores == sorted(scores, reverse=True)
        by_answer = {a["answer"]: a["score"] for a in reply["answers"]}
        assert sorted(by_answer) == sorted(setup.answers.answers)
        torch.testing.assert_close(torch.tensor([by_answer[a] for a in setup.answers.answers]), expected,
                                   rtol=1e-4, atol=1e-4)
        assert reply["text"] == record.text and reply["images"] == [record.image]
    code, reply = ask(capsys, run, "--image", chosen[0].image, "--text", chosen[0].text)
    assert len(reply["answers"]) == predict.DEFAULT_TOP and reply["model_ms"] > 0 and "warm_model_ms" not in reply
    assert reply["decoder"] == "PIL (loader workers)"  # data.decoder=auto on the CPU


def test_nlvr2_verdict_is_evaluations(synth, tmp_path, capsys):
    run, val = eval_run(tmp_path, synth, "nlvr2")
    chosen = distinct_images(val, 3)
    model, setup = evaluation(run)
    dataset = TaskDataset("nlvr2", chosen, setup.tokenizer, setup.cfg.data, replace_bad=False)
    with torch.no_grad():
        logits = torch.cat([out for _, out in task_outputs(dataset, setup, SkipCounter(), model.logits)])
    for record, expected in zip(chosen, torch.softmax(logits, dim=1)[:, 1]):
        code, reply = ask(capsys, run, "--image", record.images[0], "--image", record.images[1], "--text", record.text)
        assert code == 0, reply
        assert reply["true_probability"] == pytest.approx(float(expected), abs=1e-4)
        assert reply["answer"] == (float(expected) > 0.5)


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_text_scores_are_retrieval_evaluations(synth, tmp_path, capsys, task):
    """Each text's score is its pair's score in retrieval evaluation's matrix; a pre-training run
    is scored by its own ITM head (the zero-shot retrieval evaluation of its weights)."""
    run, val = eval_run(tmp_path, synth, task)
    images = {r.image for r in distinct_images(val, 3)}
    records = [r for r in val if r.image in images]
    model, setup = evaluation(run, "train.task=retrieval")  # a pre-training run evaluates zero-shot
    with torch.no_grad():
        ranked = retrieval_scores(model, setup, records, SkipCounter())
    texts = [r.text for r in records]
    image = records[0].image
    code, reply = ask(capsys, run, "--image", image, *(a for text in texts for a in ("--text", text)), "--repeat", "3")
    assert code == 0, reply
    assert reply["task"] == task and reply["warm_model_ms"] > 0
    scores = [t["score"] for t in reply["texts"]]
    assert scores == sorted(scores, reverse=True) and sorted(t["text"] for t in reply["texts"]) == sorted(texts)
    row = ranked.scores[ranked.img_of_text[0]]  # records[0]'s image
    got = {t["text"]: t["score"] for t in reply["texts"]}
    torch.testing.assert_close(torch.tensor([got[text] for text in texts]), row, rtol=1e-4, atol=1e-4)
    for t in reply["texts"]:
        assert t["match_probability"] == pytest.approx(float(torch.sigmoid(torch.tensor(t["score"]))), abs=1e-6)


def test_an_exported_model_answers_alike(synth, tmp_path, capsys):
    from pixelbert.tools.export import export
    run, val = eval_run(tmp_path, synth, "vqa")
    weights = export(run / "weights.pt", tmp_path / "exported")
    request = ("--image", val[0].image, "--text", val[0].text)
    _, from_run = ask(capsys, run, *request)
    code, exported = ask(capsys, run, *request, config=weights.parent / "config.json", checkpoint=weights)
    assert code == 0, exported
    assert exported["answers"] == from_run["answers"]


def test_bf16_request_is_the_fp32_one_within_bf16_rounding(synth, tmp_path, capsys):
    run, val = eval_run(tmp_path, synth, "nlvr2")
    request = ("--image", val[0].images[0], "--image", val[0].images[1], "--text", val[0].text)
    _, fp32 = ask(capsys, run, *request)
    code, bf16 = ask(capsys, run, *request, "--dtype", "bf16")
    assert code == 0, bf16
    assert bf16["dtype"] == "bf16" and bf16["true_probability"] == pytest.approx(fp32["true_probability"], abs=0.02)


@pytest.mark.parametrize("task, request_args, message", [
    ("nlvr2", ["--image", "{img}", "--text", "a statement"], "nlvr2 takes 2 image(s), got 1"),
    ("vqa", ["--image", "{img}", "--text", "q?", "--text", "another?"], "vqa takes one text (the question), got 2"),
    ("retrieval", ["--image", "{img}", "--text", " "], "a text is empty"),
    ("retrieval", ["--image", "{img}", "--image", "{img}", "--text", "a caption"], "retrieval takes 1 image(s), got 2"),
    ("retrieval", ["--image", "{img}", "--text", "a [MASK] circle"], "a pre-training run's MLM head fills it in"),
    ("vqa", ["--image", "{img}", "--text", "is the [MASK] red?"], "a vqa run has none"),
    ("vqa", ["--image", "/no/such/image.jpg", "--text", "q?"], "the image cannot be used (missing_file: /no/such/image.jpg)"),
    ("vqa", ["--image", "{img}", "--text", "q?", "--top", "0"], "--top and --repeat must be at least 1"),
    ("vqa", ["--text", "q?"], "give --image and --text (or --requests FILE)"),
    ("vqa", ["--image", "{img}", "--text", "q?", "--requests", "r.jsonl"], "give --requests or --image/--text"),
])
def test_requests_it_cannot_answer_are_refused(synth, tmp_path, capsys, task, request_args, message):
    run, val = eval_run(tmp_path, synth, task)
    image = val[0].images[0] if val[0].images else val[0].image
    code, err = ask(capsys, run, *(a.replace("{img}", image) for a in request_args))
    assert code == 2 and message in err


def test_a_checkpoint_of_another_task_is_refused(synth, tmp_path, capsys):
    run, val = eval_run(tmp_path, synth, "vqa")
    pretrain = build_model(load_config(run / "config.json", ["train.task=pretrain"]), backbone_weights=False)
    torch.save(pretrain.state_dict(), run / "pretrain.pt")  # in the VQA run: its answers.txt is found
    code, err = ask(capsys, run, "--image", val[0].image, "--text", val[0].text, checkpoint=run / "pretrain.pt")
    assert code == 2 and "lacks" in err and "vqa_head" in err
    (run / ANSWERS_FILE).unlink()
    code, err = ask(capsys, run, "--image", val[0].image, "--text", val[0].text)
    assert code == 2 and f"{run / ANSWERS_FILE} not found" in err


def test_a_text_longer_than_max_text_len_is_cut_and_said_so(synth, tmp_path, capsys):
    run, val = eval_run(tmp_path, synth, "retrieval", "data.max_text_len=8")
    long_text, short_text = "a red circle and a blue square in the top left corner", "a blue square"
    code, reply = ask(capsys, run, "--image", val[0].image, "--text", long_text, "--text", short_text)
    assert code == 0, reply
    assert reply["truncated"] == [long_text]
    # Cut: the long text scores as its first six word pieces do.
    pieces = run_tokenizer(load_config(run / "config.json").data, run).tokenize(long_text)
    assert len(pieces) > 6
    cut = " ".join(pieces[:6]).replace(" ##", "")
    _, alone = ask(capsys, run, "--image", val[0].image, "--text", cut)
    assert {t["text"]: t["score"] for t in reply["texts"]}[long_text] == pytest.approx(alone["texts"][0]["score"], abs=1e-4)


def write_requests(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_a_requests_file_is_answered_in_order_as_single_requests_are(synth, tmp_path, capsys):
    """Batched replies (images decoded in loader workers) equal one request at a time; the lines
    that cannot be answered get their error in their place and are counted."""
    run, val = eval_run(tmp_path, synth, "vqa", "data.num_workers=2", "train.eval_batch_size=3")
    good = distinct_images(val, 4)
    lines = [{"id": "q0", "image": good[0].image, "text": good[0].text},
             {"image": "/no/such.jpg", "text": "what is it?"},
             {"images": [good[1].image], "texts": [good[1].text]},
             "{not json",
             "",
             {"id": 7, "image": good[2].image, "texts": ["one?", "two?"]},
             {"id": "q3", "image": good[3].image, "text": good[3].text}]
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    code = predict.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                         "--requests", str(requests), "--out", str(tmp_path / "replies.jsonl"), "--top", "1000"])
    err = capsys.readouterr().err
    assert code == 0, err
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [r["id"] for r in replies] == ["q0", 2, 3, 4, 7, "q3"]  # line numbers where no id is given
    assert "missing_file: /no/such.jpg" in replies[1]["error"] and replies[3]["error"].startswith("line 4: not JSON")
    assert replies[4]["error"] == "vqa takes one text (the question), got 2"
    assert "3 of 6 requests answered" in err and "{'missing_file': 1, 'invalid_request': 2}" in err
    for reply, record in zip([replies[0], replies[2], replies[5]], [good[0], good[1], good[3]]):
        _, alone = ask(capsys, run, "--image", record.image, "--text", record.text, "--top", "1000")  # every answer
        assert {a["answer"]: a["score"] for a in reply["answers"]} == \
            pytest.approx({a["answer"]: a["score"] for a in alone["answers"]}, abs=1e-4)
    write_requests(requests, [{"image": "/no/such.jpg", "text": "q?"}])
    assert predict.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                         "--requests", str(requests)]) == 3  # none answered
    assert "0 of 1 requests answered" in capsys.readouterr().err


def test_batched_text_rankings_split_by_request(synth, tmp_path, capsys):
    """Requests with different numbers of texts share a batch; each gets its own texts' scores."""
    run, val = eval_run(tmp_path, synth, "retrieval", "train.eval_batch_size=4")
    images = distinct_images(val, 2)
    texts = [r.text for r in val[:6]]
    lines = [{"image": images[0].image, "texts": texts[:1]}, {"image": images[1].image, "texts": texts},
             {"image": images[0].image, "texts": texts[2:5]}]  # one image twice: one CNN pass, its own texts
    code = predict.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                         "--requests", str(write_requests(tmp_path / "requests.jsonl", lines))])
    out = capsys.readouterr()
    assert code == 0, out.err
    for line, reply in zip(lines, map(json.loads, out.out.splitlines())):
        _, alone = ask(capsys, run, "--image", line["image"], *(a for text in line["texts"] for a in ("--text", text)))
        assert sorted(t["text"] for t in reply["texts"]) == sorted(line["texts"])
        assert {t["text"]: t["score"] for t in reply["texts"]} == \
            pytest.approx({t["text"]: t["score"] for t in alone["texts"]}, abs=1e-4)


def request_scores(reply: dict, task: str, names: list[str]) -> list[float]:
    """A reply's scores in a fixed order: each of `names` (VQA's answers, retrieval's texts)."""
    if task == "nlvr2":
        return [reply["true_probability"]]
    key, name = ("answers", "answer") if task == "vqa" else ("texts", "text")
    scores = {entry[name]: entry["score"] for entry in reply[key]}
    return [scores[n] for n in names]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_dali_decodes_requests_as_pil_does(synth, tmp_path, capsys, task):
    """data.decoder=dali (its CPU pipeline here): the loader workers read file bytes and DALI
    decodes each batch's images. A request whose image passes the header check but does not
    decode (truncated) gets its reason, as with PIL; every other request's scores agree with
    PIL's within what a level or two of pixel difference moves a model, and one request alone
    is answered alike."""
    pytest.importorskip("nvidia.dali")
    run, val = eval_run(tmp_path, synth, task, "data.num_workers=1", "train.eval_batch_size=3")
    files = [str(path) for path in sorted((synth / "images").glob("*.jpg"))[:10]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(files[0]).read_bytes()[:2000])
    load_encoded(broken, 64, 128)  # its header is whole: the workers hand it over and DALI fails on it
    # One text for every request: the scores then differ between requests by their images alone.
    texts = [r.text for r in val[:3]] if task == "retrieval" else [val[0].text]
    images = [files[n:n + 2] for n in range(0, 10, 2)] if task == "nlvr2" else [[path] for path in files[:5]]
    images.insert(1, images[0])  # the same image(s) again: decoded once, two requests
    images.insert(2, [files[2], str(broken)] if task == "nlvr2" else [str(broken)])  # beside good ones in a batch
    requests = write_requests(tmp_path / "requests.jsonl", [{"images": i, "texts": texts} for i in images])
    answers = AnswerVocabulary.load(run / ANSWERS_FILE).answers if task == "vqa" else texts
    replies, summaries = {}, {}
    for decoder in ("pil", "dali"):
        code = predict.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                             "--requests", str(requests), "--top", "1000", f"data.decoder={decoder}"])
        out = capsys.readouterr()
        assert code == 0, out.err
        replies[decoder], summaries[decoder] = [json.loads(line) for line in out.out.splitlines()], out.err
    assert "images decoded by DALI (cpu)" in summaries["dali"] and "images decoded by PIL" in summaries["pil"]
    for decoder in ("pil", "dali"):
        assert "6 of 7 requests answered" in summaries[decoder] and "{'truncated': 1}" in summaries[decoder]
        assert replies[decoder][2] == {"id": 3, "error": replies["pil"][2]["error"]}
        assert f"truncated: {broken}" in replies[decoder][2]["error"]
    scores = {decoder: torch.tensor([request_scores(reply, task, answers) for n, reply in enumerate(replies[decoder])
                                     if n != 2]) for decoder in replies}
    assert not torch.equal(scores["pil"], scores["dali"])  # another decoder really ran
    # What the image adds: an untrained model's scores hang mostly on the text. Seen: DALI's
    # differ from PIL's by 0.5-5 % of its spread; reversing the order of the decoded images fails it.
    image_part = {decoder: s - s.mean(0) for decoder, s in scores.items()}
    torch.testing.assert_close(image_part["dali"], image_part["pil"], rtol=0, atol=0.25 * image_part["pil"].std().item())
    request = [a for path in images[0] for a in ("--image", path)] + [a for text in texts for a in ("--text", text)]
    _, alone = ask(capsys, run, *request, "--top", "1000", "data.decoder=dali")
    assert alone["decoder"] == "DALI (cpu)"
    assert request_scores(alone, task, answers) == pytest.approx(request_scores(replies["dali"][0], task, answers),
                                                                 abs=1e-4)


def test_pretraining_fills_each_mask_as_its_losses_score_it(synth, tmp_path, capsys):
    """A pre-training run fills each [MASK] with its MLM head, given the image: the ratio of two
    pieces' probabilities is the one the pre-training forward pass's MLM losses give them (with
    those pieces as the targets), and match_probability is exp(-ITM loss) of the pair taken as
    a match. The probabilities of every piece of the vocabulary sum to 1; another image gives
    other fills; a batch of requests gives each its own."""
    from pixelbert.data.masking import IGNORE_INDEX
    run, val = eval_run(tmp_path, synth, "pretrain")
    cfg = load_config(run / "config.json")
    tokenizer = run_tokenizer(cfg.data, run)
    text, other_text = "a [MASK] circle on the [MASK]", "two squares"
    image = val[0].image
    code, reply = ask(capsys, run, "--image", image, "--text", text, "--text", other_text,
                      "--top", str(tokenizer.vocab_size + 5))
    assert code == 0, reply
    filled = {t["text"]: t for t in reply["texts"]}
    assert "fills" not in filled[other_text] and len(filled[text]["fills"]) == 2
    for fill in filled[text]["fills"]:
        assert len(fill) == tokenizer.vocab_size  # --top beyond the vocabulary: all of it
        assert sum(f["probability"] for f in fill) == pytest.approx(1.0, abs=1e-4)
        assert [f["probability"] for f in fill] == sorted((f["probability"] for f in fill), reverse=True)
    model = build_model(cfg, backbone_weights=False).eval()
    assert not load_weights(model, run / "weights.pt").initialised
    batch = predict.request_batch(predict.Request([image], [text]), cfg, "pretrain", tokenizer)
    masks = (batch["input_ids"][0] == tokenizer.mask_id).nonzero()[:, 0].tolist()
    vocab = read_vocab(run / "tokenizer" / "vocab.txt")  # piece -> id ("##" pieces included)
    assert len(masks) == 2

    def losses(position: int, piece: str) -> dict:
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        labels[0, position] = vocab[piece]
        with torch.no_grad():
            return model({**batch, "mlm_labels": labels, "itm_labels": torch.tensor([1])})

    for position, fill in zip(masks, filled[text]["fills"]):
        first, other = fill[0], fill[len(fill) // 2]
        expected = losses(position, other["token"])["mlm_loss"] - losses(position, first["token"])["mlm_loss"]
        assert first["probability"] / other["probability"] == pytest.approx(float(torch.exp(expected)), rel=1e-3)
    assert filled[text]["match_probability"] == pytest.approx(float(torch.exp(-losses(masks[0], "a")["itm_loss"])),
                                                              abs=1e-5)
    other_image = next(r.image for r in val if r.image != image)
    _, elsewhere = ask(capsys, run, "--image", other_image, "--text", text, "--top", "3")
    assert elsewhere["texts"][0]["fills"][0] != filled[text]["fills"][0][:3]
    lines = [{"image": image, "texts": [text, other_text]}, {"image": other_image, "text": text}]
    code = predict.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"), "--top", "3",
                         "--requests", str(write_requests(tmp_path / "requests.jsonl", lines))])
    out = capsys.readouterr()
    assert code == 0, out.err
    batched = [json.loads(line) for line in out.out.splitlines()]
    for got, alone in zip([next(t for t in batched[0]["texts"] if t["text"] == text), batched[1]["texts"][0]],
                          [filled[text], elsewhere["texts"][0]]):
        for fill, fill_alone in zip(got["fills"], alone["fills"]):
            assert [f["token"] for f in fill] == [f["token"] for f in fill_alone[:3]]
            assert [f["probability"] for f in fill] == pytest.approx([f["probability"] for f in fill_alone[:3]], abs=1e-5)

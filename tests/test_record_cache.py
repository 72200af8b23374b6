"""record_cache.py: the main rank reads the training records once and packs them into the
run; every rank, and every later start with the same sources and code, opens them instead of
parsing the annotation files again; a resumed run keeps the vocabulary it was trained with."""
import json
import os
import time

import pytest
import torch

from pixelbert.config import ConfigError, load_config
from pixelbert.data import synthetic
from pixelbert.data.packed import PackedList
from pixelbert.engine import data as engine_data
from pixelbert.engine import record_cache
from pixelbert.engine.distributed import DistInfo
from tests.launch import clean_env

MAIN, OTHER = DistInfo(0, 1, 0, torch.device("cpu")), DistInfo(1, 2, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, 40, 0)
    return root


def config(run, synth, *overrides):
    return load_config("configs/tiny.json", [f"train.output_dir={run}", f"data.synthetic_dir={synth}",
                                             "data.synthetic_images=40", "model.backbone_weights=null",
                                             f"data.tokenizer_cache={run}/tokenizers", "data.num_workers=0",
                                             *overrides])


def count_reads(monkeypatch) -> list:
    reads, read_source = [], engine_data.read_source
    monkeypatch.setattr(engine_data, "read_source", lambda source: reads.append(source) or read_source(source))
    return reads


def items(dataset) -> list:
    return [dataset.groups[i] for i in range(len(dataset))] if hasattr(dataset, "groups") else list(dataset.records)


def test_pretraining_records_are_read_once_then_reused(tmp_path, synthetic_set, monkeypatch):
    """A second start, and a rank other than the main one, open the packed records without
    reading a source; they hold the same groups, sampler arrays and counts. Changing a source
    file reads the sources again."""
    reads = count_reads(monkeypatch)
    cfg = config(tmp_path / "run", synthetic_set, "data.aspect_grouping_window=4")
    first, tokenizer, sampling = engine_data.build_pretrain_data(cfg, MAIN)
    assert len(reads) == 1 and (tmp_path / "run" / "records" / "data.npy").is_file()
    for dist in (MAIN, OTHER):  # a restart; another rank of the same start
        again, tokenizer_again, sampling_again = engine_data.build_pretrain_data(cfg, dist)
        assert len(reads) == 1
        assert items(again) == items(first) and tokenizer_again.vocab_size == tokenizer.vocab_size
        assert sampling_again.source_ids.tolist() == sampling.source_ids.tolist()
        assert sampling_again.aspect_ratios.tolist() == sampling.aspect_ratios.tolist()
        assert len(set(sampling.aspect_ratios.tolist())) > 1  # the headers' sizes, not all square
        assert (sampling_again.captions, sampling_again.empty_text_skips) == (sampling.captions, sampling.empty_text_skips)
    engine_data.build_pretrain_data(config(tmp_path / "run", synthetic_set, "data.aspect_grouping_window=1"), MAIN)
    assert len(reads) == 2  # another setting that shapes the records


def test_a_changed_source_is_read_again_even_at_the_same_size_and_time(tmp_path, monkeypatch):
    """The fingerprint holds the annotation files' contents: a file rewritten in place with the
    same size and modification time (a copy that keeps times) is read again, and a file only
    touched is not."""
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 40, 0)
    reads = count_reads(monkeypatch)
    cfg = config(tmp_path / "run", synth)
    engine_data.build_pretrain_data(cfg, MAIN)
    annotations = synth / "annotations" / "captions_train.json"
    stat = annotations.stat()
    os.utime(annotations, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    engine_data.build_pretrain_data(cfg, MAIN)
    assert len(reads) == 1
    text = annotations.read_text()
    first = json.loads(text)["annotations"][0]["caption"]
    changed = text.replace(first, first[::-1], 1)  # same length, another caption
    assert changed != text and len(changed) == len(text)
    annotations.write_text(changed)
    os.utime(annotations, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dataset, _, _ = engine_data.build_pretrain_data(cfg, MAIN)
    assert len(reads) == 2
    assert any(first[::-1] in group.texts for group in items(dataset))


def test_a_resumed_run_keeps_its_vocabulary_when_the_captions_change(tmp_path, monkeypatch):
    """The vocabulary is trained on the captions; a restart after they changed would train
    another, whose ids the checkpoint's embeddings do not follow. A resumed run keeps its own
    (a new run trains anew), and one whose data.lowercase differs from it stops."""
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 40, 0)
    first = engine_data.build_pretrain_data(config(tmp_path / "run", synth), MAIN)[1]
    vocab = (tmp_path / "run" / "tokenizer" / "vocab.txt").read_text()
    annotations = synth / "annotations" / "captions_train.json"
    data = json.loads(annotations.read_text())
    for n, annotation in enumerate(data["annotations"]):
        annotation["caption"] = f"zebras graze quietly beside giraffes number {n}"
    annotations.write_text(json.dumps(data))
    resumed = engine_data.build_pretrain_data(config(tmp_path / "run", synth, "train.resume=true"), MAIN)[1]
    assert (tmp_path / "run" / "tokenizer" / "vocab.txt").read_text() == vocab
    assert resumed.encode("a red circle", 10) == first.encode("a red circle", 10)
    with pytest.raises(ValueError, match="made with do_lower_case=true"):
        engine_data.build_pretrain_data(config(tmp_path / "run", synth, "train.resume=true", "data.lowercase=false"),
                                        MAIN)
    fresh = engine_data.build_pretrain_data(config(tmp_path / "new", synth), MAIN)[1]
    assert "zebras" in (tmp_path / "new" / "tokenizer" / "vocab.txt").read_text().split()
    assert fresh.unk_id not in fresh.encode("zebras graze", 10)


def test_a_records_cache_is_shared_by_runs(tmp_path, synthetic_set, monkeypatch):
    """With data.records_cache, a second run on the same sources opens the first run's records
    from the cache (nothing in its own folder); a run whose records differ gets its own entry."""
    reads = count_reads(monkeypatch)
    cache = tmp_path / "cache"
    first, _, _ = engine_data.build_pretrain_data(config(tmp_path / "a", synthetic_set, f"data.records_cache={cache}"), MAIN)
    again, _, _ = engine_data.build_pretrain_data(config(tmp_path / "b", synthetic_set, f"data.records_cache={cache}"), MAIN)
    assert len(reads) == 1 and items(again) == items(first)
    assert not (tmp_path / "a" / "records").exists() and not (tmp_path / "b" / "records").exists()
    assert [p.name[:8] for p in cache.iterdir()] == ["records-"]
    engine_data.build_pretrain_data(config(tmp_path / "c", synthetic_set, f"data.records_cache={cache}",
                                           "data.aspect_grouping_window=1"), MAIN)
    assert len(reads) == 2 and len(list(cache.iterdir())) == 2  # no temporary folder left either


def runs_end() -> None:
    """What the end of the runs started in this process does to their records: the locks go."""
    for held in record_cache._HELD:
        held.close()
    record_cache._HELD.clear()


def test_the_records_cache_tool_lists_and_prunes_by_last_use(tmp_path, synthetic_set, capsys):
    """A run that reuses an entry marks it used; --prune-days deletes only the entries no run
    has used for that long (and a killed build's leftovers), never one a live process holds,
    and lists what is kept."""
    from pixelbert.tools import records_cache
    cache = tmp_path / "cache"
    for window in (4, 1):  # two runs, two entries
        engine_data.build_pretrain_data(config(tmp_path / f"w{window}", synthetic_set, f"data.records_cache={cache}",
                                               f"data.aspect_grouping_window={window}"), MAIN)
    runs_end()
    month_ago = time.time() - 30 * 86400
    for entry in records_cache.entries(cache):
        os.utime(entry.folder / "fingerprint", (month_ago, month_ago))
    leftover = cache / ".records.abc_1234.tmp"
    leftover.mkdir()
    os.utime(leftover, (month_ago, month_ago))
    # A later run on the first entry's sources reuses it: marked used now, and held while it lives.
    kept, _, _ = engine_data.build_pretrain_data(config(tmp_path / "again", synthetic_set,
                                                        f"data.records_cache={cache}", "data.aspect_grouping_window=4"), MAIN)
    assert [e.last_used > month_ago + 86400 for e in records_cache.entries(cache)] == [False, True]
    capsys.readouterr()
    assert records_cache.main([str(cache), "--prune-days", "7"]) == 0
    report = capsys.readouterr().out
    assert "1 entries deleted" in report and "1 entries," in report and "last used 0.0 days ago" in report
    (remaining,) = cache.iterdir()
    assert remaining.name.startswith("records-") and items(kept) == list(PackedList.open(remaining))
    assert records_cache.main([str(tmp_path / "nowhere")]) == 2
    # Old but held by a live process (the run above): kept; once its run ends, it goes.
    os.utime(remaining / "fingerprint", (month_ago, month_ago))
    assert records_cache.main([str(cache), "--prune-days", "7"]) == 0
    assert "kept (a running job holds it) records-" in capsys.readouterr().out and remaining.is_dir()
    runs_end()
    deleted, busy = records_cache.prune(cache, 7)
    assert [e.folder for e in deleted] == [remaining] and busy == [] and not any(cache.iterdir())


def test_publishing_replaces_outdated_records_and_keeps_a_racing_runs(tmp_path):
    """Records are written beside their folder and renamed into place: an outdated folder is
    replaced whole; when another run published the same records first, theirs stay; a build
    that fails leaves the old folder as it was; no temporary folder is left behind."""
    from pixelbert.engine.record_cache import holds, publish
    folder = tmp_path / "records"
    publish(folder, "old", lambda: ([["a"], ["b"]], {"notes": []}))
    assert holds(folder, "old") and list(PackedList.open(folder)) == [["a"], ["b"]]
    publish(folder, "new", lambda: ([["c"]], {"notes": []}))
    assert holds(folder, "new") and not holds(folder, "old") and list(PackedList.open(folder)) == [["c"]]
    publish(folder, "new", lambda: ([["raced"]], {"notes": []}))  # the same key: the folder already there wins
    assert list(PackedList.open(folder)) == [["c"]]

    def broken():
        raise ValueError("bad source")
    with pytest.raises(ValueError, match="bad source"):
        publish(folder, "newer", broken)
    assert holds(folder, "new") and [p.name for p in tmp_path.iterdir()] == ["records"]
    # What a killed build leaves (it never reaches its `finally`) goes once it is a day old.
    killed, building, users = (tmp_path / name for name in (".records.abc_1234.tmp", ".records-eval-val.def_5678.tmp",
                                                             ".records.old"))
    for path in (killed, building, users):
        (path / "sub").mkdir(parents=True)
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    os.utime(users, (time.time() - 2 * 86400,) * 2)  # not a name publish makes: left alone
    publish(folder, "newest", lambda: ([["d"]], {"notes": []}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".records-eval-val.def_5678.tmp", ".records.old", "records"]


def test_vqa_records_and_answers_are_shared(tmp_path, synthetic_set, monkeypatch):
    """Fine-tuning data: the other ranks take the records, the answer vocabulary and the skip
    counts the main rank made."""
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 40, 0)
    questions = synth / "annotations" / "vqa_questions_train.json"
    blanked = json.loads(questions.read_text())
    blanked["questions"][0]["question"] = " "
    questions.write_text(json.dumps(blanked))
    reads = count_reads(monkeypatch)
    cfg = config(tmp_path / "run", synth, "train.task=vqa", "task.min_answer_count=1")
    main = engine_data.build_training_data(cfg, MAIN)
    other = engine_data.build_training_data(cfg, OTHER)
    assert len(reads) == 1
    assert other.answers.answers == main.answers.answers and len(main.answers.answers) > 3
    assert other.startup_skips == main.startup_skips and [r for r, _ in main.startup_skips] == ["empty_text"]
    assert other.startup_attempts == main.startup_attempts == len(blanked["questions"])
    assert other.description == main.description


def test_records_missing_on_another_rank_are_a_clear_error(tmp_path, synthetic_set):
    """A rank that cannot see the main rank's records (train.output_dir not shared) says so."""
    cfg = config(tmp_path / "run", synthetic_set)
    engine_data.build_pretrain_data(cfg, MAIN)
    (tmp_path / "run" / "records" / "fingerprint").write_text("another start's")
    with pytest.raises(ConfigError, match="must be on a file system every rank sees"):
        engine_data.build_pretrain_data(cfg, OTHER)


@pytest.mark.slow
def test_a_broken_source_stops_every_rank(tmp_path):
    """Only the main rank reads the sources: its error reaches the other rank, and both stop
    with it at once instead of one waiting for records that never come."""
    from tests.launch import run_deepspeed
    images = tmp_path / "images"
    images.mkdir()
    broken = tmp_path / "captions.json"
    broken.write_text('{"images": [], "annotations": [')
    source = json.dumps([{"format": "coco_captions", "annotations": str(broken), "images": str(images)}])
    result = run_deepspeed(["train.py", "--config", "configs/tiny.json", f"train.output_dir={tmp_path / 'run'}",
                            "model.backbone_weights=null", f"data.train={source}", "train.eval_every=0", "train.max_steps=2",
                            "train.warmup_steps=1"], 2,
                           clean_env(PYTHONUNBUFFERED="1"), timeout=300)
    assert result.returncode != 0
    message = f"error: {broken}: invalid JSON at line 1"
    assert result.stderr.count(message) >= 2, result.stderr[-4000:]  # once per rank
    assert "Traceback" not in result.stderr  # the user's file: its message, not the engine's stack

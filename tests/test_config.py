import json

import pytest

from pixelbert.config import ConfigError, load_config


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "model": {"backbone": "tiny", "hidden_size": 64, "num_attention_heads": 4},
        "train": {"max_steps": 10},
        "deepspeed": {"train_micro_batch_size_per_gpu": 2},
    }))
    return path


def test_loads_typed_sections(config_file):
    cfg = load_config(config_file)
    assert cfg.model.hidden_size == 64 and cfg.model.backbone == "tiny"
    assert cfg.train.max_steps == 10 and cfg.micro_batch_size == 2 and cfg.grad_accum_steps == 1
    assert cfg.data.max_text_len == 40  # default


def test_overrides(config_file):
    cfg = load_config(config_file, ["train.max_steps=20", "model.hidden_act=relu",
                                    "train.adam_betas=[0.8, 0.9]", "deepspeed.zero_optimization.stage=3",
                                    "data.tokenizer=/some/folder", "train.lr=3e-4"])
    assert cfg.train.max_steps == 20
    assert cfg.model.hidden_act == "relu"
    assert cfg.train.adam_betas == [0.8, 0.9]
    assert cfg.deepspeed["zero_optimization"] == {"stage": 3}
    assert cfg.data.tokenizer == "/some/folder"
    assert cfg.train.lr == pytest.approx(3e-4)


def test_source_list_override(config_file):
    cfg = load_config(config_file, ['data.train=[{"format": "coco_captions", "annotations": "a.json", "images": "im"}]'])
    assert cfg.data.train[0].annotations == "a.json"


def test_real_training_data_needs_its_own_validation_data(config_file, tmp_path):
    """With data.train naming sources, validation on an empty data.val would evaluate the
    synthetic set in its place: a config error for train.eval_every, an error for evaluate."""
    from pixelbert.engine.data import named_sources
    source = 'data.train=[{"format": "coco_captions", "annotations": "a.json", "images": "im"}]'
    with pytest.raises(ConfigError, match="name data.val"):
        load_config(config_file, [source, "train.eval_every=100"])
    cfg = load_config(config_file, [source, "train.eval_every=100", source.replace("data.train", "data.val")])
    assert named_sources(cfg, "val")[0].annotations == "a.json"
    with pytest.raises(ValueError, match="synthetic set's, not your data's"):
        named_sources(load_config(config_file, [source]), "val")
    synthetic_only = load_config(config_file, ["train.eval_every=100", f"data.synthetic_dir={tmp_path}"])
    assert named_sources(synthetic_only, "val")[0].annotations == str(tmp_path / "annotations" / "captions_val.json")


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "unknown config key model.hiden_size"),
    ("trian.max_steps=3", "unknown config section"),
    ("train.max_steps=ten", "train.max_steps must be an integer"),
    ("train.max_steps=2.5", "train.max_steps must be an integer"),
    ("model.channels_last=1", "model.channels_last must be true or false"),
    ("train.lr=fast", "train.lr must be a number"),
    ("model.num_attention_heads=5", "must be divisible by model.num_attention_heads"),
    ("model.pixel_samples=0", "model.pixel_samples must be >= 1"),
    ("model.backbone=vgg16", "model.backbone must be one of"),
    ("train.optimizer_kernel=apex", "train.optimizer_kernel must be one of"),
    ("model.hidden_dropout_prob=1.5", "model.hidden_dropout_prob must be in [0, 1]"),
    ("data.image_shorter=32", "data.image_shorter must be >= 64"),
    ("data.train=[{\"format\": \"csv\", \"annotations\": \"a\", \"images\": \"b\"}]", "data.train[0].format"),
    ("train.warmup_steps=50", "train.warmup_steps must be in [0, train.max_steps]"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", "deepspeed.train_micro_batch_size_per_gpu"),
    ("deepspeed.optimizer={\"type\": \"Adam\"}", "deepspeed.optimizer/scheduler"),
    ("model.kernels=cuda", "model.kernels must be one of"),
    ("train.eval_every=-1", "train.eval_every must be >= 0"),
    ("train.eval_records=-5", "train.eval_records must be >= 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be >= 1"),
    ("task.shortlist=50", "task.shortlist needs the contrastive similarity"),
    ("task.retrieval_folds=1", "task.retrieval_folds must be 0 (off) or at least 2"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("train.best_metric=overall", "train.best_metric='overall' is not a validation number of train.task='pretrain'"),
    ("train.best_metric=mlm_loss", "train.best_metric needs validation"),
    ("train.best_mode=lowest", "train.best_mode must be one of"),
    ("task.contrastive_weight=-1", "task.contrastive_weight must be >= 0"),
    ("task.contrastive_dim=0", "task.contrastive_dim must be >= 1"),
])
def test_bad_values_name_the_key(config_file, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(config_file, [override])
    assert message in str(err.value)


def test_bad_override_syntax_and_json(tmp_path, config_file):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(config_file, ["train.max_steps"])
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {"backbone": "tiny",}}')
    with pytest.raises(ConfigError, match="line 1 column"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["tiny", "r50", "x152"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.json")
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0


def test_bert_checkpoint_brings_its_vocabulary(tmp_path):
    """BERT's embeddings follow its own token ids: without data.tokenizer the run takes the
    checkpoint's vocab.txt (a vocabulary trained on the captions would scramble them)."""
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    (bert / "model.safetensors").write_bytes(b"weights")
    (bert / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    assert load_config("configs/tiny.json", [f"model.bert_checkpoint={bert}"]).data.tokenizer == str(bert)
    weights_file = load_config("configs/tiny.json", [f"model.bert_checkpoint={bert / 'model.safetensors'}"])
    assert weights_file.data.tokenizer == str(bert)
    own = tmp_path / "vocab.txt"
    assert load_config("configs/tiny.json", [f"model.bert_checkpoint={bert}", f"data.tokenizer={own}"]).data.tokenizer \
        == str(own)
    (bert / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    with pytest.raises(ConfigError, match=r"data.lowercase=true but the tokenizer has do_lower_case=false"):
        load_config("configs/tiny.json", [f"model.bert_checkpoint={bert}"])
    assert load_config("configs/tiny.json", [f"model.bert_checkpoint={bert}", "data.lowercase=false"]).data.lowercase is False
    (bert / "vocab.txt").unlink()
    with pytest.raises(ConfigError, match=r"no vocab.txt in .*bert-base-uncased; set data.tokenizer"):
        load_config("configs/tiny.json", [f"model.bert_checkpoint={bert}", "data.lowercase=false"])


def test_resume_changes_name_what_a_resumed_run_computes_differently(config_file):
    """A resumed run's config against its checkpoint's: changed settings as dotted keys, added
    ones too, and none of the settings that only steer logging, saving, validation or loading."""
    from pixelbert.config import resume_changes
    saved = load_config(config_file).to_dict()
    current = load_config(config_file, ["train.resume=true", "train.log_every=1", "train.stop_at_step=3",
                                        "data.num_workers=0", "train.lr=0.5", "deepspeed.gradient_accumulation_steps=2"])
    assert resume_changes(saved, current.to_dict()) == \
        ["deepspeed.gradient_accumulation_steps: null -> 2", "train.lr: 0.0001 -> 0.5"]
    assert resume_changes(None, current.to_dict()) == []  # a checkpoint written before they held the config


def test_tokenizer_casing_must_match_data_lowercase(tmp_path):
    """data.tokenizer's casing: its tokenizer_config.json's do_lower_case when it has one, else
    judged from its words (a folder with vocab.txt alone, as Google released BERT); a mismatch
    with data.lowercase would turn words into [UNK] without a sign, so it is a config error."""
    words = [f"word{n}" for n in range(1200)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cased, uncased = tmp_path / "cased", tmp_path / "uncased"
    for folder, vocab in ((cased, words[:600] + [w.capitalize() for w in words[600:]]), (uncased, words)):
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(specials + vocab + ["##s"]) + "\n")
    with pytest.raises(ConfigError, match=r"data.lowercase=true but .*cased vocabulary \(50% of its words hold "
                                          r"capitals, e.g. Word600"):
        load_config("configs/tiny.json", [f"data.tokenizer={cased}"])
    assert load_config("configs/tiny.json", [f"data.tokenizer={cased}", "data.lowercase=false"]).data.lowercase is False
    with pytest.raises(ConfigError, match="data.lowercase=false but .*is an uncased vocabulary"):
        load_config("configs/tiny.json", [f"data.tokenizer={uncased / 'vocab.txt'}", "data.lowercase=false"])
    assert load_config("configs/tiny.json", [f"data.tokenizer={uncased / 'vocab.txt'}"]).data.lowercase is True
    (cased / "tokenizer_config.json").write_text('{"do_lower_case": true}')  # the folder's own word wins
    assert load_config("configs/tiny.json", [f"data.tokenizer={cased}"]).data.lowercase is True
    small = tmp_path / "small"
    small.mkdir()
    (small / "vocab.txt").write_text("\n".join(specials + ["a", "b"]) + "\n")  # too few words to judge
    assert load_config("configs/tiny.json", [f"data.tokenizer={small}", "data.lowercase=false"]).data.lowercase is False


def test_text_longer_than_the_position_table_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.max_text_len \(65\) exceeds model.max_position_embeddings \(64\)"):
        load_config("configs/tiny.json", ["data.max_text_len=65"])
    load_config("configs/tiny.json", ["data.max_text_len=64"])

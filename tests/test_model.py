"""PixelBert: pixel sampling, BERT parity, heads, and the paper-scale config on the meta device."""
import pytest
import torch
import transformers

from pixelbert.config import load_config
from pixelbert.model import IGNORE_INDEX, PixelBert
from tests.helpers import random_batch, tiny_config


SIZES = [(100, 130), (230, 64), (64, 64), (192, 250)]


def test_sampled_positions_are_valid_unique_and_seeded():
    model = PixelBert(tiny_config(pixel_samples=5))
    pixels = model.pixel_embeddings
    sizes = torch.tensor(SIZES)
    grid_h, grid_w = 256 // 64, 256 // 64  # padded to 256x256: 8x8 features, 4x4 pooled
    valid = pixels.valid_grid(sizes, grid_h, grid_w)
    # ceil(h/32) features, whole 2x2 cells only.
    assert valid.tolist() == [[2, 2], [4, 1], [1, 1], [3, 4]]
    seeds = torch.tensor([11, 12, 13, 14])
    positions, mask = pixels.select(valid, grid_h, grid_w, sample=True, seeds=seeds)
    for b in range(len(SIZES)):
        chosen = positions[b][mask[b]].tolist()
        n_valid = int(valid[b].prod())
        assert len(chosen) == min(5, n_valid)
        assert len(set(chosen)) == len(chosen)
        for pos in chosen:
            r, c = divmod(pos, grid_w)
            assert r < valid[b, 0] and c < valid[b, 1], f"image {b} sampled padded cell {(r, c)}"
    again, _ = pixels.select(valid, grid_h, grid_w, sample=True, seeds=seeds)
    assert torch.equal(again, positions)
    other, _ = pixels.select(valid, grid_h, grid_w, sample=True, seeds=seeds + 100)
    assert not torch.equal(other[3][mask[3]], positions[3][mask[3]])


def test_sampling_covers_every_valid_cell_over_draws():
    pixels = PixelBert(tiny_config(pixel_samples=3)).pixel_embeddings
    valid = torch.tensor([[3, 4]])
    seen = set()
    for seed in range(200):
        positions, mask = pixels.select(valid, 4, 5, sample=True, seeds=torch.tensor([seed]))
        seen.update(positions[0][mask[0]].tolist())
    assert seen == {r * 5 + c for r in range(3) for c in range(4)}


def test_sampling_off_gives_all_valid_positions_in_order():
    pixels = PixelBert(tiny_config()).pixel_embeddings
    valid = torch.tensor([[2, 2], [4, 1], [3, 4]])
    positions, mask = pixels.select(valid, 4, 4, sample=False, seeds=None)
    for b, (h, w) in enumerate(valid.tolist()):
        assert positions[b][mask[b]].tolist() == [r * 4 + c for r in range(h) for c in range(w)]


def test_pixel_tokens_are_pooled_features_plus_visual_type():
    torch.manual_seed(0)
    model = PixelBert(tiny_config()).eval()
    batch = random_batch(SIZES)
    pixels = model.pixel_embeddings
    tokens, mask = pixels(batch["images"], batch["image_sizes"], sample=False)
    feat = pixels.proj(pixels.backbone(batch["images"]))
    pooled = torch.nn.functional.max_pool2d(feat, 2)  # [B, D, Hp, Wp]
    valid = pixels.valid_grid(batch["image_sizes"], pooled.shape[2], pooled.shape[3])
    for b, (h, w) in enumerate(valid.tolist()):
        want = pooled[b, :, :h, :w].flatten(1).T + pixels.visual_type
        torch.testing.assert_close(tokens[b][mask[b]], want)
        assert not tokens[b][~mask[b]].any()


def test_too_small_image_is_a_clear_error():
    pixels = PixelBert(tiny_config()).pixel_embeddings
    with pytest.raises(ValueError, match="over 32 px"):
        pixels.valid_grid(torch.tensor([[32, 200]]), 4, 4)


def test_forward_losses_and_gradients():
    torch.manual_seed(0)
    model = PixelBert(tiny_config()).train()
    out = model(random_batch(SIZES))
    assert torch.isfinite(out["loss"]) and out["mlm_count"] == len(SIZES)
    torch.testing.assert_close(out["loss"].detach(), out["mlm_loss"] + out["itm_loss"])
    out["loss"].backward()
    assert model.pixel_embeddings.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.pixel_embeddings.visual_type.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_batch_without_masked_tokens_still_reaches_every_head():
    model = PixelBert(tiny_config()).train()
    batch = random_batch(SIZES)
    batch["mlm_labels"].fill_(IGNORE_INDEX)
    out = model(batch)
    assert out["mlm_loss"] == 0 and out["mlm_count"] == 0
    out["loss"].backward()
    assert model.cls.predictions.bias.grad is not None


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = PixelBert(tiny_config())
    rows = torch.randn(3, model.cfg.hidden_size)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[7].mul_(50.0)
    want = model.cls.predictions.transform(rows) @ model.embeddings.word_embeddings.weight.T
    torch.testing.assert_close(model.mlm_logits(rows), want + model.cls.predictions.bias)
    # One owner: the decoder adds no parameter of its own.
    assert not any("decoder" in name for name, _ in model.named_parameters())


BERT_DIMS = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=96, max_position_embeddings=32, type_vocab_size=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("head, safe", [("BertModel", True), ("BertForPreTraining", False)])
def test_bert_parity_after_loading_checkpoint(tmp_path, head, safe):
    torch.manual_seed(1)
    hf = getattr(transformers, head)(transformers.BertConfig(**BERT_DIMS)).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=safe)

    model = PixelBert(tiny_config()).eval()
    report = model.load_bert_checkpoint(str(tmp_path))
    # BertModel has no MLM head: exactly that head stays at its init.
    assert all(k.startswith("cls.predictions.") for k in report.missing)
    assert (report.missing == []) == (head == "BertForPreTraining"), report.missing
    ids = torch.randint(0, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        bert = hf if head == "BertModel" else hf.bert
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.encode_text(ids, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if head == "BertForPreTraining":
            assert any(k.startswith("cls.seq_relationship") for k in report.unused)
            torch.testing.assert_close(model.mlm_logits(got), hf.cls.predictions(want), atol=1e-5, rtol=1e-5)
        else:
            assert report.unused == [] or all("position_ids" in k for k in report.unused)


def test_bert_checkpoint_shape_mismatch_and_missing(tmp_path):
    hf = transformers.BertModel(transformers.BertConfig(**{**BERT_DIMS, "vocab_size": 120}))
    hf.save_pretrained(tmp_path)
    model = PixelBert(tiny_config())
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        model.load_bert_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model.load_bert_checkpoint(str(tmp_path / "nowhere"))


def test_x152_config_builds_on_meta_device():
    cfg = load_config("configs/x152.json")
    with torch.device("meta"):
        model = PixelBert(cfg.model)
    # Frozen BatchNorm keeps its affine as buffers: count weights the way torchvision does.
    backbone = sum(t.numel() for k, t in model.pixel_embeddings.backbone.state_dict().items()
                   if not k.endswith(("running_mean", "running_var")))
    frozen_affine = backbone - sum(p.numel() for p in model.pixel_embeddings.backbone.parameters())
    total = sum(p.numel() for p in model.parameters()) + frozen_affine
    print(f"x152 Pixel-BERT: {total:,} parameters, backbone {backbone:,}")
    assert backbone == 120_323_392  # ResNeXt-152 32x8d without fc (tests/test_backbone.py)
    assert 1.0e8 < total - backbone < 1.2e8  # BERT-base (~110M incl. pooler) + heads + 1x1 conv
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("switch", ["checkpoint_backbone", "checkpoint_encoder"])
def test_activation_checkpointing_changes_nothing_but_memory(switch):
    """Recomputing in backward gives the same loss and gradients (dropout on: its masks replay)."""
    from tests.test_packing import grouped_batch
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = PixelBert(tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                      **{switch: on})).train()
        torch.manual_seed(1)
        out = model(grouped_batch(seed=2))
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_backbone_matches_eager():
    from tests.test_packing import grouped_batch
    torch.manual_seed(0)
    eager = PixelBert(tiny_config()).eval()
    compiled = PixelBert(tiny_config(compile_backbone="default")).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged by compile
    batch = grouped_batch(seed=4)
    torch.testing.assert_close(compiled(batch)["loss"], eager(batch)["loss"], rtol=1e-4, atol=1e-5)


def test_head_init_fan_in():
    """model.head_init="fan_in" scales the pooler, ITM and task heads' linear weights to
    1/sqrt(fan-in); "bert" leaves them at initializer_range; the encoder is the same in both."""
    from pixelbert.model.tasks import PixelBertForNLVR2, PixelBertForVQA
    torch.manual_seed(0)
    bert = PixelBert(tiny_config(hidden_size=256, num_attention_heads=4))
    fan_in = PixelBert(tiny_config(hidden_size=256, num_attention_heads=4, head_init="fan_in"))
    for model, std in ((bert, 0.02), (fan_in, 256 ** -0.5)):
        for head in (model.pooler.dense, model.itm_head):
            assert head.weight.std().item() == pytest.approx(std, rel=0.1)
    assert bert.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(
        fan_in.encoder.layer[0].attention.self.query.weight.std().item(), rel=0.1)
    vqa = PixelBertForVQA(tiny_config(hidden_size=256, num_attention_heads=4, head_init="fan_in"), 7)
    assert vqa.vqa_head[0].weight.std().item() == pytest.approx(256 ** -0.5, rel=0.1)
    assert vqa.vqa_head[3].weight.std().item() == pytest.approx(512 ** -0.5, rel=0.2)
    nlvr2 = PixelBertForNLVR2(tiny_config(hidden_size=256, num_attention_heads=4, head_init="fan_in"))
    assert nlvr2.nlvr2_head[0].weight.std().item() == pytest.approx(512 ** -0.5, rel=0.1)


def test_init_from_wins_over_the_bert_checkpoint(tmp_path):
    """A fine-tuning run whose config still names BERT (as a pre-training config does) starts
    from the pre-trained Pixel-BERT: task.init_from loads over the BERT checkpoint, which only
    fills what init_from lacks."""
    from pixelbert.engine.weights import load_initial_weights
    torch.manual_seed(2)
    transformers.BertModel(transformers.BertConfig(**BERT_DIMS)).save_pretrained(tmp_path / "bert")
    bert_only = PixelBert(tiny_config())
    bert_only.load_bert_checkpoint(str(tmp_path / "bert"))
    torch.manual_seed(3)
    pretrained = PixelBert(tiny_config()).state_dict()
    query, value = "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.weight"
    del pretrained[value]  # a tensor the pre-trained run lacks: BERT's stays
    torch.save(pretrained, tmp_path / "pretrained.pt")
    said = []
    model = PixelBert(tiny_config())
    load_initial_weights(model, None, str(tmp_path / "bert"), str(tmp_path / "pretrained.pt"), said.append)
    state, bert = model.state_dict(), bert_only.state_dict()
    assert not torch.equal(pretrained[query], bert[query])
    torch.testing.assert_close(state[query], pretrained[query], rtol=0, atol=0)
    torch.testing.assert_close(state[value], bert[value], rtol=0, atol=0)
    assert said[0].startswith(f"BERT checkpoint {tmp_path / 'bert'}")
    assert said[1].startswith(f"initialised from {tmp_path / 'pretrained.pt'} (over the BERT checkpoint)")
    assert value in said[1]  # listed as initialised here


def test_init_from_with_the_whole_cnn_does_not_read_backbone_weights(tmp_path):
    """A fine-tuning config keeps the pre-training's model.backbone_weights, but the pre-trained
    run holds the CNN: the file is then not read (the fine-tuning machine need not have it). A
    run that lacks CNN tensors gets them from the file, and its own over them."""
    from pixelbert.engine.weights import load_initial_weights
    from pixelbert.model.backbone import build_backbone
    torch.manual_seed(4)
    pretrained = PixelBert(tiny_config()).state_dict()
    torch.save(pretrained, tmp_path / "pretrained.pt")
    said = []
    model = PixelBert(tiny_config())
    load_initial_weights(model, str(tmp_path / "absent.pth"), None, str(tmp_path / "pretrained.pt"), said.append)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, pretrained[name], rtol=0, atol=0)
    assert said[0] == (f"the CNN comes from {tmp_path / 'pretrained.pt'}: "
                       f"model.backbone_weights ({tmp_path / 'absent.pth'}) is not read")

    torch.manual_seed(5)
    imagenet = build_backbone(tiny_config().backbone).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    stem, deep = "pixel_embeddings.backbone.conv1.weight", "pixel_embeddings.backbone.layer1.0.conv1.weight"
    pretrained_stem = pretrained.pop(stem)  # the pre-trained run lacks one CNN tensor
    torch.save(pretrained, tmp_path / "partial.pt")
    said = []
    model = PixelBert(tiny_config())
    load_initial_weights(model, str(tmp_path / "imagenet.pth"), None, str(tmp_path / "partial.pt"), said.append)
    state = model.state_dict()
    assert not torch.equal(imagenet["conv1.weight"], pretrained_stem)
    torch.testing.assert_close(state[stem], imagenet["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state[deep], pretrained[deep], rtol=0, atol=0)
    assert said[0] == f"CNN weights {tmp_path / 'imagenet.pth'} (where {tmp_path / 'partial.pt'} lacks them)"
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        load_initial_weights(PixelBert(tiny_config()), str(tmp_path / "absent.pth"), None,
                             str(tmp_path / "partial.pt"), said.append)

"""PixelBert: pixel embeddings + text embeddings -> one BERT encoder -> MLM and ITM heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pixelbert.attention import Packing, attention_probs
from pixelbert.config import ModelConfig
from pixelbert.data.masking import IGNORE_INDEX
from pixelbert.model import bert_checkpoint
from pixelbert.model.bert_checkpoint import LoadReport
from pixelbert.model.embeddings import PixelEmbeddings, TextEmbeddings
from pixelbert.model.encoder import Encoder
from pixelbert.model.heads import MLMHead, Pooler
from pixelbert.model.packing import Encoded, packed_layout


class PixelBert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.pixel_embeddings = PixelEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        self.cls = MLMHead(cfg)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self._init_transformer_weights()
        self._init_heads(self.pooler, self.itm_head)

    # ---- initialisation -------------------------------------------------------------------
    def _init_transformer_weights(self, root: Optional[nn.Module] = None) -> None:
        """BERT's init for everything (or everything in `root`) but the CNN (which keeps its own)."""
        backbone = set(self.pixel_embeddings.backbone.modules())
        for module in (root if root is not None else self).modules():
            if module in backbone:
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.initializer_range)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if root is None:
            nn.init.normal_(self.pixel_embeddings.visual_type, std=self.cfg.initializer_range)

    def _init_heads(self, *heads: nn.Module) -> None:
        """model.head_init="fan_in": the heads' linear weights normal with std 1/sqrt(fan-in)
        (they keep BERT's init otherwise)."""
        if self.cfg.head_init != "fan_in":
            return
        for head in heads:
            for module in head.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def load_bert_checkpoint(self, path: str) -> LoadReport:
        """Load a Hugging Face BERT checkpoint (folder or file) into the text side and encoder."""
        return bert_checkpoint.load_into(self, path)

    # ---- encoding -------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder on text alone: [B, L, D] hidden states (as BertModel.last_hidden_state)."""
        hidden = self.embeddings(input_ids, token_type_ids)
        return self.encoder(hidden, attention_mask.bool())

    def encode(self, batch: dict, *, sample_pixels: bool, packed: Optional[bool] = None,
               num_layers: Optional[int] = None, feat: Optional[torch.Tensor] = None) -> Encoded:
        """Run the single stream `[CLS] text [SEP] pixels` of every (text, image) pair: text n
        goes with image `pair_image[n]` (image n when the batch has no pair_image). Packed (one
        sequence per pair, no padding) or padded: `packed`, else `model.packed_sequences`.
        `num_layers`: stop after the first encoder layers (0: the embeddings). `feat`: the
        images' pixel features (`pixel_embeddings.features`) when the caller already has them."""
        images = batch["images"]
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if batch["input_ids"].shape[-1] > self.cfg.max_position_embeddings:
            raise ValueError(f"text of {batch['input_ids'].shape[-1]} tokens exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        if feat is None:
            feat = self.pixel_embeddings.features(images)
        cells, pixel_mask = self.pixel_embeddings.select_cells(
            feat, batch["image_sizes"], sample=sample_pixels, sample_seeds=batch.get("sample_seeds"),
            pair_image=batch.get("pair_image"))
        if self.cfg.packed_sequences if packed is None else packed:
            return self._encode_packed(batch, feat, cells, pixel_mask, num_layers)
        text = self.embeddings(batch["input_ids"], batch.get("token_type_ids"))
        pixel_mask = pixel_mask.to(feat.device, non_blocking=True)
        pixels = feat.new_zeros(*pixel_mask.shape, feat.shape[1], dtype=text.dtype)
        pixels[pixel_mask] = self.pixel_embeddings.pool_rows(feat, cells).to(text.dtype)
        hidden = torch.cat([text, pixels], dim=1)
        key_mask = torch.cat([batch["attention_mask"].bool(), pixel_mask], dim=1)
        hidden = self.encoder(hidden, key_mask, num_layers=num_layers)
        return Encoded(hidden, text.shape[1], key_mask=key_mask)

    def _encode_packed(self, batch: dict, feat: torch.Tensor, cells: torch.Tensor,
                       pixel_mask: torch.Tensor, num_layers: Optional[int]) -> Encoded:
        text_mask = batch["attention_mask"].bool()
        layout = packed_layout(text_mask.cpu(), pixel_mask)
        device = feat.device
        packing = Packing.from_lengths(layout.lengths, device)
        hidden = torch.empty(packing.total, self.cfg.hidden_size, device=device,
                             dtype=self.embeddings.word_embeddings.weight.dtype)
        input_ids = batch["input_ids"]
        token_type_ids = batch.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        position_ids = torch.arange(input_ids.shape[-1], device=device).expand_as(input_ids)
        hidden = self.embeddings.embed_rows(input_ids[text_mask], position_ids[text_mask],
                                            token_type_ids[text_mask], hidden,
                                            layout.text_rows.to(device, non_blocking=True))
        hidden = self.pixel_embeddings.pool_rows(feat, cells, out=hidden,
                                                 out_index=layout.pixel_rows.to(device, non_blocking=True))
        hidden = self.encoder(hidden, packing=packing, num_layers=num_layers)
        return Encoded(hidden, input_ids.shape[1], packing=packing)

    def attention_maps(self, batch: dict, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head attention probabilities of encoder layer `layer` for every pair, with all
        valid pixels (no sampling): [N, heads, L+P, L+P] over the padded stream `[CLS] text
        [SEP] pixels`, and its key mask [N, L+P] (True = a real token). Computed on the padded
        math path, whatever the training layout; call it in eval mode for maps without dropout."""
        if not 0 <= layer < self.cfg.num_hidden_layers:
            raise ValueError(f"layer must be in [0, {self.cfg.num_hidden_layers}), got {layer}")
        attention = self.encoder.layer[layer].attention.self
        with torch.no_grad():
            encoded = self.encode(batch, sample_pixels=False, packed=False, num_layers=layer)
            q = attention.heads(attention.query(encoded.hidden)).transpose(1, 2)
            k = attention.heads(attention.key(encoded.hidden)).transpose(1, 2)
            return attention_probs(q, k, encoded.key_mask), encoded.key_mask

    # ---- pre-training heads -----------------------------------------------------------------
    def itm_logits(self, encoded: Encoded) -> torch.Tensor:
        """ITM logits [N, 2] (fp32; no match, match) of every pair of `encoded`."""
        return self.itm_head(self.pooler(encoded.cls_rows())).float()

    def match_scores(self, encoded: Encoded) -> torch.Tensor:
        """Matching score of every pair of `encoded`: the ITM logit margin, match minus no
        match (what retrieval ranks by)."""
        logits = self.itm_logits(encoded)
        return logits[:, 1] - logits[:, 0]

    def mlm_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (fp32) of the given rows through the MLM head and the tied decoder."""
        return self.cls(hidden_rows, self.embeddings.word_embeddings.weight).float()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """MLM + ITM losses and accuracies of a pre-training batch (see pixelbert.data.dataset)."""
        encoded = self.encode(batch, sample_pixels=self.training)
        itm_logits = self.itm_logits(encoded)
        itm_labels = batch["itm_labels"]
        itm_loss = F.cross_entropy(itm_logits, itm_labels)

        mlm_labels = batch["mlm_labels"]
        masked = mlm_labels != IGNORE_INDEX
        if masked.any():
            mlm_logits = self.mlm_logits(encoded.text_rows(masked))
            mlm_targets = mlm_labels[masked]
            mlm_loss = F.cross_entropy(mlm_logits, mlm_targets)
            mlm_correct = (mlm_logits.argmax(-1) == mlm_targets).sum()
        else:
            # No masked token in this micro-batch: a zero loss that still touches the head, so
            # every rank produces gradients for the same parameters.
            mlm_loss = self.mlm_logits(encoded.cls_rows()[:1]).sum() * 0.0
            mlm_correct = torch.zeros((), device=itm_logits.device, dtype=torch.long)
        return {
            "loss": mlm_loss + itm_loss,
            "mlm_loss": mlm_loss.detach(),
            "itm_loss": itm_loss.detach(),
            "mlm_correct": mlm_correct.detach(),
            "mlm_count": masked.sum().detach(),
            "itm_correct": (itm_logits.argmax(-1) == itm_labels).sum().detach(),
            "itm_count": torch.tensor(itm_labels.numel(), device=itm_logits.device),
        }

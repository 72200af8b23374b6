"""Loader batches -> model inputs on the device, one batch ahead of the training step.

The preparer decodes images handed over as file bytes (DALI), drops and counts the ones no
decoder can read, counts the loader's skips, and moves the batch to the device. The
prefetcher prepares batch t+1 in a background thread while step t runs; on a GPU its copies
go to a side stream, so host->device transfers and DALI's decoding overlap compute.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import torch

from pixelbert.data.dataset import drop_images, padded_fraction
from pixelbert.data.errors import DataError
from pixelbert.data.skips import SkipCounter

BOOKKEEPING = ("image_keys", "skips", "attempts")


def to_device(batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """The model's inputs: tensors on the device, floating ones in the model's dtype, other
    values (question ids, identifiers) as they are; the loader's bookkeeping left behind."""
    def move(value):
        if not torch.is_tensor(value):
            return value
        value = value.to(device, non_blocking=True)
        return value.to(float_dtype) if value.is_floating_point() else value
    return {key: move(value) for key, value in batch.items() if key not in BOOKKEEPING}


def decode_images(batch: dict[str, Any], decoder: Callable) -> tuple[Optional[dict[str, Any]], list]:
    """(the batch with its `encoded` images decoded by `decoder` — less each image it cannot
    read and every pair (a task batch: every item) that uses one, None when no pair is left —
    and those images' failures [(position in batch["image_keys"], skip reason, detail)])."""
    decoded = decoder(batch["encoded"])
    batch = {k: v for k, v in batch.items() if k != "encoded"}
    if decoded.failed:
        keep = torch.ones(len(batch["image_keys"]), dtype=torch.bool)
        keep[[position for position, _, _ in decoded.failed]] = False
        batch = drop_images(batch, keep)
        if len(batch["input_ids"]) == 0:
            return None, decoded.failed
    batch["images"], batch["image_sizes"] = decoded.images, decoded.sizes
    return batch, decoded.failed


class BatchPreparer:
    def __init__(self, device: torch.device, float_dtype: torch.dtype, skips: SkipCounter,
                 decoder: Optional[Callable] = None):
        """`decoder(list of encoded images)` -> object with images, sizes and failed
        [(position, reason, detail)], as `pixelbert.data.dali_decode.DaliImageDecoder`."""
        self.device, self.float_dtype, self.skips, self.decoder = device, float_dtype, skips, decoder
        self.last_decoded: Optional[dict[str, Any]] = None  # stands in for a micro-batch with no image left
        self.failed: list = []  # the failures of the last batch decode() left empty

    def __call__(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(model inputs on the device, batch statistics)."""
        self.skips.add(batch["skips"], batch["attempts"])
        if "encoded" in batch:
            batch = self._decode(batch)
        height, width = batch["images"].shape[-2:]
        stats = {"padded_fraction": padded_fraction(batch["image_sizes"].cpu(), height, width),
                 "images": len(batch["image_sizes"])}
        return to_device(batch, self.device, self.float_dtype), stats

    def _decode(self, batch: dict[str, Any]) -> dict[str, Any]:
        decoded = self.decode(batch)
        if decoded is None:
            return self._stand_in(self.failed)
        self.last_decoded = decoded
        return decoded

    def decode(self, batch: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The batch with its `encoded` images decoded. An image the decoder cannot read is
        counted (as a skip, not as another attempt: the loader counted the record) and dropped
        with its pairs; None when no pair is left (`failed` then says why)."""
        if self.decoder is None:
            raise RuntimeError("the loader handed over encoded images but no batch decoder is set")
        decoded, failed = decode_images(batch, self.decoder)
        for position, reason, detail in failed:
            self.skips.add([(reason, f"{reason}: {batch['image_keys'][position]} ({detail})")], 0)
        if decoded is None:
            self.failed = failed
        return decoded

    def _stand_in(self, failed: list) -> dict[str, Any]:
        """A micro-batch none of whose images decodes (counted above) still has to be a step on
        every rank: the last decoded micro-batch stands in, as a random other record stands in
        for an unreadable one on the PIL path. Keeping it costs one micro-batch of memory."""
        if self.last_decoded is None:
            raise DataError(f"no image of the first micro-batch could be decoded ({len(failed)} images, the "
                               f"first: {failed[0][1]}: {failed[0][2]}) and no earlier batch can stand in")
        return self.last_decoded


class Prefetcher:
    """Iterates prepared (inputs, stats) batches, preparing the next as soon as one is handed out."""

    def __init__(self, batches: Iterator[dict], prepare: Callable[[dict], tuple[dict, dict]],
                 device: torch.device):
        self.batches, self.prepare = batches, prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0  # time the training loop waited for a batch, for the data-wait metric
        # One thread: the loader iterator, the side stream and DALI's pipeline stay on it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelbert-prefetch")
        self._next = self._thread.submit(self._load)

    def _load(self) -> tuple[dict, dict]:
        raw = next(self.batches)
        if self.stream is None:
            return self.prepare(raw)
        with torch.cuda.stream(self.stream):
            inputs, stats = self.prepare(raw)
        self.stream.synchronize()  # DALI and the copies are done before the step may use them
        return inputs, stats

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        start = time.perf_counter()
        inputs, stats = self._next.result()  # re-raises what the loader or decoder raised
        self.wait_s += time.perf_counter() - start
        if self.stream is not None:
            for value in inputs.values():  # memory made on the side stream, used on the main one
                if torch.is_tensor(value):
                    value.record_stream(torch.cuda.current_stream())
        self._next = self._thread.submit(self._load)
        return inputs, stats

    def close(self) -> None:
        """Stop prefetching and end the loader's worker processes now: persistent workers would
        otherwise end only when the iterator is collected, and exit_process skips that (they
        then linger until their watchdog sees the parent gone)."""
        self._next.cancel()
        self._thread.shutdown(wait=True)
        shutdown_workers = getattr(self.batches, "_shutdown_workers", None)  # a DataLoader iterator's
        if shutdown_workers is not None:
            shutdown_workers()

"""DALI image decoding: the fast path that gives what `images.load_image` + `pad_images` give.

The loader workers read the encoded bytes; a `DaliImageDecoder` turns a list of them into one
padded batch, decoding on the GPU (`mixed`, nvJPEG / the hardware JPEG decoder) or the CPU
(`cpu`, libjpeg-turbo through nvImageCodec):

    decode (RGB, EXIF orientation applied) -> resize to `resize_size` (linear, antialiased)
    -> normalise (ImageNet mean/std) -> zero-pad bottom/right to the batch max rounded up to
    `pad_multiple` -> torch [B, 3, H, W] float32, channels_last, without a copy (DLPack).

Agreement with the PIL path (tests/test_dali.py measures it):
- Sizes are equal by construction: every header is parsed once in Python by the PIL path's own
  `open_checked` (which also refuses empty data, non-images and absurd sizes with the PIL path's
  skip reasons) and the target (h, w) from `resize_size` is fed to DALI per sample.
- DALI's CPU decoder gives the same 8-bit RGB as PIL's `decode_rgb` bit for bit for JPEG (RGB,
  grayscale, Adobe CMYK, every EXIF orientation) and 8-bit PNG (RGB, RGBA, palette, L, LA),
  and within 1/255 for 16-bit PNG (DALI rounds v * 255 / 65535, PIL keeps the high byte).
  Anything else (GIF, 1-bit PNG, TIFF, WebP, BMP, ...: formats or modes not checked, or not
  DALI's) is decoded by PIL's `decode_rgb` in Python and handed to DALI as an uncompressed
  BMP, so it agrees by construction. What remains is the resize arithmetic: one 8-bit level
  inside the image, two on the outermost rows/columns (mean about 0.2 of a level) for
  photo-like images. The two filters weight the border differently, so where a hard edge
  meets the border after a strong downscale that outermost row/column can differ by ~10
  levels (seen on the synthetic set's drawn shapes, 4.5x down; tests/test_tasks.py). The GPU
  decoder (nvJPEG) does not share libjpeg-turbo's IDCT, so it differs a little more.
- A sample DALI refuses is decoded again alone; if PIL cannot decode it either it is reported
  with PIL's reason ("truncated"), otherwise it goes through the BMP route and is kept.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import BadSample
from .images import PixelNorm, decode_rgb, open_checked, resize_size, upright_size

# (PIL format, PIL mode) pairs DALI decodes to the same RGB as `decode_rgb` (tests/test_dali.py);
# everything else is decoded by PIL and passed to DALI as BMP.
NATIVE_MODES = {
    "JPEG": {"RGB", "L", "CMYK"},
    "MPO": {"RGB", "L", "CMYK"},  # a camera JPEG with extra frames: both decoders take the first
    "PNG": {"RGB", "RGBA", "P", "L", "LA", "I;16", "I;16B", "I;16L", "I"},
}


@functools.cache
def dali_available() -> bool:
    """Whether DALI can be imported (checked once)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except (ImportError, OSError):  # not installed, or its shared libraries do not load
        return False
    return True


@dataclass
class DecodedBatch:
    """The good images of a batch, in input order, and what was dropped.

    images: float32 [B, 3, H, W], channels_last, zero-padded bottom/right.
    sizes: int64 [B, 2], the valid (h, w) of each image.
    failed: (position in the input, skip reason, detail) for each dropped input.
    """
    images: torch.Tensor
    sizes: torch.Tensor
    failed: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class _Sample:
    position: int
    data: np.ndarray       # 1-D uint8, the encoded image DALI decodes
    size: tuple[int, int]  # target (h, w)


class DaliImageDecoder:
    """Decode, resize, normalise and pad a batch of encoded images with DALI.

    `device_id=None` decodes on the CPU; an int decodes on that GPU (`mixed`: nvJPEG, with
    `hw_decoder_load` of the JPEGs sent to the hardware decoder where the GPU has one) and
    returns CUDA tensors.

    Output lifetime: the returned images are the DALI output buffer itself (DLPack, no copy).
    The pipeline runs DALI's dynamic executor, which allocates fresh outputs every run and
    never writes into a buffer it has handed out, so a batch stays valid after later calls,
    for as long as the caller holds the tensor (the DLPack deleter then returns the memory to
    DALI's pool). Writing into it in place is allowed: nothing else reads it.
    At most `max_batch_size` inputs per call.
    """

    def __init__(self, shorter: int, longer: int, pad_multiple: int, *, norm: PixelNorm, device_id: int | None,
                 hw_decoder_load: float = 0.65, num_threads: int = 4, max_batch_size: int = 64):
        if not dali_available():
            raise RuntimeError("nvidia-dali is not installed; use the PIL path (images.load_image)")
        if min(shorter, longer, pad_multiple, num_threads, max_batch_size) < 1 or shorter > longer:
            raise ValueError(f"need 1 <= shorter <= longer and positive pad_multiple, num_threads, "
                             f"max_batch_size; got {shorter=} {longer=} {pad_multiple=} "
                             f"{num_threads=} {max_batch_size=}")
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        self.shorter, self.longer, self.pad_multiple, self.norm = shorter, longer, pad_multiple, norm
        self.device_id, self.hw_decoder_load = device_id, hw_decoder_load
        self.num_threads, self.max_batch_size = num_threads, max_batch_size
        self._pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None
        decoder_args = {"hw_decoder_load": self.hw_decoder_load,
                        # nvJPEG's default chroma upsampling differs from libjpeg-turbo's
                        # (PIL's); this makes the GPU decoder use the same one.
                        "jpeg_fancy_upsampling": True} if gpu else {}

        # prefetch_queue_depth=1 lets run() take the inputs; exec_dynamic gives every run
        # fresh output buffers (see the class docstring).
        @pipeline_def(batch_size=self.max_batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (h, w)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB, adjust_orientation=True,
                                       **decoder_args)
            # uint8 out (rounded), like PIL's resize of an 8-bit image
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="HWC",
                mean=list(self.norm.mean), std=list(self.norm.std))
            return fn.pad(images, axis_names="HW", align=[self.pad_multiple] * 2, fill_value=0.0)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, encoded: list[np.ndarray]) -> DecodedBatch:
        """Decode a batch of encoded images (1-D uint8 arrays, or bytes), one per image."""
        if len(encoded) > self.max_batch_size:
            raise ValueError(f"{len(encoded)} images > max_batch_size={self.max_batch_size}")
        samples, failed = [], []
        for position, data in enumerate(encoded):
            try:
                samples.append(self._prepare(position, data))
            except BadSample as e:
                failed.append((position, e.reason, e.detail))
        if not samples:
            return DecodedBatch(*self._empty(), failed)
        try:
            images = self._run(samples)
        except RuntimeError:
            # A sample the header check let through but DALI cannot decode (truncated or
            # corrupt data). After an error DALI calls the pipeline invalid: rebuild it, then
            # find the culprits one by one (a rare, slow path).
            self._pipe = self._build()
            kept = []
            for sample in samples:
                try:
                    kept.append(self._check_alone(sample))
                except BadSample as e:
                    failed.append((sample.position, e.reason, e.detail))
            if len(kept) == len(samples) and all(a is b for a, b in zip(kept, samples)):
                raise  # every sample decodes alone: the failure is not the data's
            failed.sort()
            samples = kept
            if not samples:
                return DecodedBatch(*self._empty(), failed)
            images = self._run(samples)
        sizes = torch.tensor([s.size for s in samples], dtype=torch.int64)
        return DecodedBatch(images, sizes, failed)

    def _prepare(self, position: int, data) -> _Sample:
        """Header check and target size in Python (PIL parses the header only); unusual
        formats and modes are decoded here and re-encoded losslessly for DALI."""
        where = f"batch position {position}"
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
            else np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if array.size == 0:
            raise BadSample("empty_file", where)
        img = open_checked(array, where, self.shorter, self.longer)  # BadSample for bad headers
        size = resize_size(*upright_size(img), self.shorter, self.longer)
        if img.mode not in NATIVE_MODES.get(img.format, ()):
            array = _as_bmp(decode_rgb(img, where))
        return _Sample(position, array, size)

    def _check_alone(self, sample: _Sample) -> _Sample:
        """The sample if DALI decodes it alone, else PIL's verdict: a BadSample, or (PIL
        decodes it) the same image re-encoded as BMP."""
        try:
            self._run([sample])
            return sample
        except RuntimeError as e:
            self._pipe = self._build()
            lines = [line.strip() for line in str(e).splitlines()
                     if line.strip() and "no longer valid" not in line]
            dali_error = lines[-1] if lines else type(e).__name__
        where = f"batch position {sample.position}"
        img = open_checked(sample.data, where, self.shorter, self.longer)
        rgb = decode_rgb(img, where)  # BadSample("truncated") when PIL cannot decode it either
        retry = _Sample(sample.position, _as_bmp(rgb), sample.size)
        try:
            self._run([retry])
        except RuntimeError:
            self._pipe = self._build()
            raise BadSample("not_an_image", where, f"DALI cannot decode it: {dali_error}") from None
        return retry

    def _run(self, samples: list[_Sample]) -> torch.Tensor:
        (out,) = self._pipe.run(encoded=[s.data for s in samples],
                                size=[np.array(s.size, dtype=np.float32) for s in samples])
        dense = out.as_tensor()  # a view: fn.pad made every sample the same shape
        if self.device_id is None:
            nhwc = torch.from_dlpack(dense)
        else:
            with torch.cuda.device(self.device_id):
                nhwc = torch.from_dlpack(dense)
        return nhwc.permute(0, 3, 1, 2)  # [B, 3, H, W] over the NHWC buffer: channels_last

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        images = torch.zeros(0, 3, 0, 0, device=device).contiguous(memory_format=torch.channels_last)
        return images, torch.zeros(0, 2, dtype=torch.int64)


def _as_bmp(img) -> np.ndarray:
    """An 8-bit RGB PIL image as uncompressed BMP bytes (lossless, quick both ways)."""
    buffer = io.BytesIO()
    img.save(buffer, format="BMP")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)

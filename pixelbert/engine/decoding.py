"""Which decoder turns image files into pixels: DALI on the training device, or PIL in the
loader workers."""
from __future__ import annotations

from typing import Optional

import torch

from pixelbert.config import ConfigError


def build_decoder(data_cfg, device: torch.device, max_batch_size: int) -> tuple[Optional[object], str]:
    """(batch decoder or None for PIL in the workers, its name for the log).

    "auto" takes DALI when it is installed and training runs on a GPU ("mixed": nvJPEG and the
    hardware JPEG decoder). On a CPU it takes PIL: PIL decodes in the loader's worker processes,
    beside the training step, where DALI would decode in the training process itself.
    """
    from pixelbert.data.dali_decode import DaliImageDecoder, dali_available
    choice = data_cfg.decoder
    if choice == "auto":
        choice = "dali" if dali_available() and device.type == "cuda" else "pil"
    if choice == "pil":
        return None, "PIL (loader workers)"
    if not dali_available():
        raise ConfigError("data.decoder='dali' but NVIDIA DALI is not installed: pip install "
                           "nvidia-dali-cuda130, or set data.decoder=pil")
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    decoder = DaliImageDecoder(data_cfg.image_shorter, data_cfg.image_longer, data_cfg.pad_multiple,
                               norm=data_cfg.pixel_norm(), device_id=device_id, hw_decoder_load=data_cfg.dali_hw_decoder_load,
                               num_threads=data_cfg.dali_threads,
                               max_batch_size=max_batch_size)
    return decoder, f"DALI ({'mixed, GPU ' + str(device_id) if device_id is not None else 'cpu'})"

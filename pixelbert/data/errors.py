"""Bad input: the reasons a record is skipped, and the exception that carries one."""
from __future__ import annotations

# Why a record was skipped; metrics.jsonl and the end-of-run summary count skips by these names.
SKIP_REASONS = (
    "missing_file",   # the image file does not exist
    "empty_file",     # zero bytes
    "not_an_image",   # random bytes, HTML, an unknown format
    "truncated",      # the file ends before the image data does
    "bad_size",       # too small for one pooled pixel cell, or absurd (e.g. 20000x50)
    "empty_text",     # empty or whitespace-only caption / question / statement
)


class BadSample(Exception):
    """A record that cannot be used. Loaders count and skip it; it never ends a run by itself."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        self.reason, self.where, self.detail = reason, str(where), detail
        super().__init__(f"{reason}: {where}" + (f" ({detail})" if detail else ""))


class DataError(ValueError):
    """The configured data cannot be used as given: an annotation file not in its format (the
    message names the file, the line or entry, and the key), sources that hold no usable
    record, a vocabulary that does not fit the text. The user's to fix, so the entry points
    print the message alone (exit 2), not a traceback; on several ranks the main rank's error
    reaches every rank (engine/distributed.py on_main)."""


def plain_message(error: BaseException) -> str:
    """`error`'s own message. An error raised in a DataLoader worker reaches the main process
    as the same type around a message that holds the worker's traceback; the user needs the
    last part only (the entry points print it: no traceback for the data's errors)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    cut = text.rfind(name)
    return text[cut + len(name):].strip() if cut >= 0 else text

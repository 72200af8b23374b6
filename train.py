"""Pixel-BERT pre-training.

    deepspeed train.py --config configs/x152.json [key.path=value ...]
    python train.py --config configs/tiny.json train.max_steps=20
"""
from __future__ import annotations

import argparse
import sys

from pixelbert.config import ConfigError, load_config
from pixelbert.engine.distributed import configure_accelerator, exit_process


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config file (configs/*.json)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.max_steps=20")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    configure_accelerator()
    from pixelbert.data.errors import DataError, plain_message
    from pixelbert.data.skips import TooManyBadRecords
    from pixelbert.engine.preemption import StoppedBySignal
    from pixelbert.engine.trainer import train
    from pixelbert.engine.distributed import shutdown_distributed
    try:
        train(cfg)
    except FileNotFoundError as e:  # a configured path that is not there: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # found once the run starts (train.resume_strict, DALI missing, ...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # an annotation file not in its format, sources without records
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 2
    except TooManyBadRecords as e:  # the data, not the engine: its own exit code, no traceback
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 3
    except FloatingPointError as e:  # the run diverged (a non-finite loss): its own exit code
        print(f"error: {e}", file=sys.stderr)
        return 4
    except StoppedBySignal:  # checkpoint saved, said in the log: not finished, so not 0
        return cfg.train.signal_exit_code
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())

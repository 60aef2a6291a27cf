"""Logging for the command lines: one stderr handler that keeps progress bars intact, `-v`/`-q`
levels, and the one place where dependency noise a user cannot act on is filtered."""

from __future__ import annotations

import logging
import sys
import warnings

from tqdm import tqdm

# Messages of dependencies that say nothing a unetseg user can act on.
_IGNORED_WARNINGS = (
    r".*does not have many workers which may be a bottleneck.*",
    r".*The '(train|val)_dataloader' does not have many workers.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*GPU available but not used.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*This overload of nonzero is deprecated.*",
)
# Lightning's loggers, and what of theirs is advertisement or said better by unetseg's own run summary
# (device, precision, seed, why fit stopped: see unetseg.training.report).
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)
_ADVERTISEMENTS = (
    "Tip:",
    "litlogger",
    "litmodels",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "Loading `train_dataloader` to estimate",
    "`Trainer.fit` stopped",
    "Automatic Mixed Precision",
    "`weights_only` was not set",
    "Time limit reached.",
)


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _ADVERTISEMENTS)


class _Formatter(logging.Formatter):
    """Plain messages for information, "warning: ..." and "error: ..." for the rest (as argparse)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _TqdmHandler(logging.Handler):
    """Writes through `tqdm.write`, so log lines do not break a progress bar on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def verbosity_level(verbose: int = 0, quiet: int = 0) -> int:
    """The logging level of `-v` (debug, tracebacks) and `-q` (warnings only) counts."""
    return logging.DEBUG if verbose > quiet else logging.WARNING if quiet > verbose else logging.INFO


def setup_logging(level: int = logging.INFO) -> None:
    """Send unetseg's log records to stderr at `level`, and quiet the dependencies."""
    logger = logging.getLogger("unetseg")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    quiet_dependencies(level)


def quiet_dependencies(level: int = logging.INFO) -> None:
    """Filter warnings and advertisements of dependencies that a user cannot act on (shown again at debug level)."""
    if level <= logging.DEBUG:
        return
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
            logger.addFilter(_DropAdvertisements())


def add_verbosity_flags(parser) -> None:
    """-v/--verbose and -q/--quiet on an argparse parser."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output (debug, tracebacks)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")

"""FoloVLLM's loggers: `folovllm.*`, shown on stderr at INFO by default, as vLLM does, so that a
user sees what start-up is doing. FOLOVLLM_LOGGING_LEVEL changes the level; FOLOVLLM_CONFIGURE_LOGGING=0
leaves logging entirely to the application."""

from __future__ import annotations

import logging
import os

_ROOT = "folovllm"


def _configure() -> None:
    root = logging.getLogger(_ROOT)
    if os.environ.get("FOLOVLLM_CONFIGURE_LOGGING", "1") == "0" or root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("FOLOVLLM_LOGGING_LEVEL", "INFO").upper())
    # The application's own root handlers (if any) would print every line twice.
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    _configure()
    return logging.getLogger(name)


def set_level(level: str) -> None:
    _configure()
    logging.getLogger(_ROOT).setLevel(level.upper())

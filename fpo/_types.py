"""Type aliases that the fpo package's signatures share."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Log", "PathLike", "Device", "Model", "Tokenizer"]

Log = Callable[..., None]  # print, or anything that takes what print takes
PathLike = str | os.PathLike
Device = str | torch.device
# a transformers causal LM (PreTrainedModel) or a module that answers like one: its config, get_decoder(),
# lm_head; Any because its attributes come from the config at run time
Model = Any
Tokenizer = Any  # a transformers tokenizer (PreTrainedTokenizerBase)

"""Model architectures, registered by name."""

from torch import nn

from bigmodel.models.gpt import GPT

MODELS: dict[str, type[nn.Module]] = {"gpt": GPT}

__all__ = ["GPT", "MODELS"]

"""bigmodel: train, compress and serve large neural networks with PyTorch."""

from bigmodel.config import GPTConfig, RunConfig, TrainConfig, resolve_config
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "RunConfig", "TrainConfig", "Tokenizer", "UserError", "resolve_config"]

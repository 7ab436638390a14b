"""Training tasks, registered by name (`train --task NAME`); see tasks/base.py for the contract."""

from bigmodel.tasks.autoencode import AutoencodeTask
from bigmodel.tasks.base import Batch, BatchStream, Task
from bigmodel.tasks.classify import ClassifyTask
from bigmodel.tasks.lm import LMTask
from bigmodel.tasks.mlm import MLMTask
from bigmodel.tasks.seq2seq import Seq2SeqTask

TASKS: dict[str, type[Task]] = {
    "lm": LMTask,
    "classify": ClassifyTask,
    "seq2seq": Seq2SeqTask,
    "mlm": MLMTask,
    "autoencode": AutoencodeTask,
}

__all__ = [
    "TASKS",
    "AutoencodeTask",
    "Batch",
    "BatchStream",
    "ClassifyTask",
    "LMTask",
    "MLMTask",
    "Seq2SeqTask",
    "Task",
]

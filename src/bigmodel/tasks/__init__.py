"""Training tasks, registered by name (`train --task NAME`); see tasks/base.py for the contract."""

from bigmodel.tasks.base import Batch, BatchStream, Task
from bigmodel.tasks.lm import LMTask

TASKS: dict[str, type[Task]] = {"lm": LMTask}

__all__ = ["TASKS", "Batch", "BatchStream", "LMTask", "Task"]

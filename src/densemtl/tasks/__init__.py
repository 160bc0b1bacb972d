"""Dense prediction tasks: one declaration each (``semseg``, ``depth``, ``normals``, ``edges``,
and ``disp``, depth learned from video) and the registry every other module looks tasks up in.

    from densemtl.tasks import get_task, register_task
    get_task("depth").decode(raw)          # metres
    register_task(MyTask())                # a new task: see the README, "Adding a task"
"""

from .base import (
    IGNORE_INDEX,
    Task,
    TaskLoss,
    TaskMetric,
    get_task,
    parse_tasks,
    register_task,
    registered_tasks,
    task_for_label,
    unregister_task,
)
from .depth import DepthTask, depth_to_inverse, inverse_to_depth
from .disp import DispTask
from .edges import EdgesTask
from .normals import NormalsTask
from .semseg import SemsegTask

for _task in (SemsegTask, DepthTask, NormalsTask, EdgesTask, DispTask):
    register_task(_task)

__all__ = [
    "IGNORE_INDEX",
    "DepthTask",
    "DispTask",
    "EdgesTask",
    "NormalsTask",
    "SemsegTask",
    "Task",
    "TaskLoss",
    "TaskMetric",
    "depth_to_inverse",
    "get_task",
    "inverse_to_depth",
    "parse_tasks",
    "register_task",
    "registered_tasks",
    "task_for_label",
    "unregister_task",
]

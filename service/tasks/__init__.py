"""The task registry: every task a model can serve, each declared whole in its own module.

A task module holds its request and answer schemas, the checks that decode a request, pre-processing into
model inputs, the compiled program (head) it needs, and post-processing exactly as the reference pipeline;
it ends with a `TASK = ModelTask(...)`. The routes are generated from this registry (service/api/routes/
tasks.py), so adding a task is its module and one line below.
"""

from __future__ import annotations

from . import classify, fill_mask, ner, qa, rerank, zero_shot
from .base import Endpoint, ModelTask
from .embed import dense as embed
from .embed import sparse as sparse_embed

TASKS: dict[str, ModelTask] = {
    task.name: task
    for task in (
        classify.TASK,
        fill_mask.TASK,
        qa.TASK,
        ner.TASK,
        embed.TASK,
        zero_shot.TASK,
        rerank.TASK,
        sparse_embed.TASK,
    )
}

# A checkpoint's default task, from config.json's `architectures`.
DEFAULT_TASK_OF_ARCHITECTURE = {arch: task.name for task in TASKS.values() for arch in task.default_for}


def endpoints() -> list[tuple[ModelTask, Endpoint]]:
    return [(task, endpoint) for task in TASKS.values() for endpoint in task.endpoints]

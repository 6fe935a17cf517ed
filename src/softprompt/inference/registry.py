"""The engine's task registry: a name -> task map that batches read without locking.

The map is replaced wholesale (copy-on-write) under a lock; a batch takes one snapshot at its
start, so adding, replacing or removing a task never disturbs a running batch.
"""

from __future__ import annotations

import threading

from softprompt.inference.tasks import Task, TaskInfo


class TaskNotFoundError(KeyError):
    """No task of that name; the message lists the known tasks."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, sorted(known)
        self.message = f"unknown task {name!r}; known tasks: {', '.join(self.known) or '(none)'}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class TaskRegistry:
    """Loaded tasks by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}

    def snapshot(self) -> dict[str, Task]:
        """The current tasks; the dict is never mutated afterwards."""
        return self._tasks

    def put(self, task: Task) -> None:
        """Add a task, replacing one of the same name."""
        with self._lock:
            self._tasks = {**self._tasks, task.info.name: task}

    def remove(self, name: str) -> None:
        """Drop a task; batches holding an earlier snapshot keep using it.

        Raises:
            TaskNotFoundError: no task of that name.
        """
        with self._lock:
            if name not in self._tasks:
                raise TaskNotFoundError(name, list(self._tasks))
            self._tasks = {key: task for key, task in self._tasks.items() if key != name}

    def infos(self) -> list[TaskInfo]:
        """The loaded tasks, by name."""
        return [task.info for _, task in sorted(self._tasks.items())]

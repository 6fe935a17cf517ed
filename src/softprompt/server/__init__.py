"""HTTP serving of prompt-tuned tasks: FastAPI routes, micro-batcher, metrics, security.

Needs the optional ``serve`` extra (``pip install 'softprompt[serve]'``). Import the parts from
their modules (``softprompt.server.app.create_app``, ``softprompt.server.run.serve``); this
package itself imports nothing heavy, so ``import softprompt.server`` (and ``ServeOptions``)
works without the extra.
"""

from __future__ import annotations

from typing import Any

from softprompt.server.options import ServeOptions

__all__ = ["ServeOptions", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: fastapi and the engine load only when the server is actually used.
    if name == "create_app":
        from softprompt.server.app import create_app

        return create_app
    if name == "serve":
        from softprompt.server.run import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

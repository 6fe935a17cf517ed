"""HTTP serving of prompt-tuned tasks: FastAPI app, micro-batcher, metrics, security.

Needs the optional ``serve`` extra (``pip install 'softprompt[serve]'``). Import the parts from
their modules (``softprompt.server.app.create_app``, ``softprompt.server.run.serve``); this
package itself imports nothing heavy, so ``import softprompt.server`` works without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy: fastapi and the engine load only when the server is actually used.
    if name in ("create_app", "ServerSettings"):
        from softprompt.server import app

        return getattr(app, name)
    if name == "serve":
        from softprompt.server.run import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

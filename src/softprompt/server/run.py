"""Run the server: build the engine for a model and its tasks, then serve it with uvicorn.

``serve`` is the Python API behind ``softprompt serve`` (whose flags are the fields of
:class:`~softprompt.server.options.ServeOptions`); start a server from a shell or a subprocess
with ``python -m softprompt serve --model M --task NAME=DIR ...``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any

from softprompt.server.options import ServeOptions

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "SOFTPROMPT_ADMIN_KEY"


def _import_serving() -> tuple[Any, Any]:
    try:
        import uvicorn

        from softprompt.server.app import create_app
    except ImportError as error:  # fastapi/uvicorn/prometheus-client: the optional "serve" extra
        raise ImportError(f"serving needs the 'serve' extra ({error}); install it with "
                          "pip install 'softprompt[serve]'") from error
    return uvicorn, create_app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(options: ServeOptions) -> Any:
    """Builds the app; the engine itself loads in the background once the server starts.

    Args and Raises: as :func:`serve` (``host``, ``port`` and ``log_level`` are not used here).
    """
    _, create_app = _import_serving()
    from softprompt.models import check_model_loadable

    check_model_loadable(options.model)  # fail before the slow model load, not in the background

    def make_engine() -> Any:
        from softprompt.inference import Engine

        return Engine(options.model, device=options.device, dtype=options.dtype)

    return create_app(make_engine, options)


def serve(options: ServeOptions) -> None:
    """Serves prompt-tuned tasks over one frozen model until interrupted.

    The HTTP port opens at once; ``GET /health`` answers 503 until the model and the tasks have
    loaded, then 200. Without ``options.admin_key`` the key is read from ``SOFTPROMPT_ADMIN_KEY``;
    with neither the admin endpoints answer 403.

    Args:
        options: The model, startup tasks, address, batching, limits and security.

    Raises:
        FileNotFoundError: The model path does not exist.
        ValueError: A model name that is neither bundled nor a path.
        ImportError: The ``serve`` extra (fastapi, uvicorn, prometheus-client) is not installed.
    """
    uvicorn, _ = _import_serving()
    if not options.admin_key and os.environ.get(ADMIN_KEY_ENV):
        options = dataclasses.replace(options, admin_key=os.environ[ADMIN_KEY_ENV])
    app = build_app(options)
    if not _is_loopback(options.host):
        logger.warning("binding %s: the server is reachable from the network%s", options.host,
                       "" if options.admin_key else " (admin endpoints are disabled: no admin key)")
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level,
                timeout_graceful_shutdown=int(options.request_timeout) + 5)

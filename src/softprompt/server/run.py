"""Run the server: build the engine for a model and its tasks, then serve it with uvicorn.

``serve`` is the Python API behind ``softprompt serve``; ``python -m softprompt.server.run``
runs it directly with the same options (the load test spawns servers this way).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "SOFTPROMPT_ADMIN_KEY"


def _import_serving() -> tuple[Any, Any]:
    try:
        import uvicorn

        from softprompt.server.app import create_app
    except ImportError as error:  # fastapi/uvicorn are the optional "serve" extra
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


def _check_model_name(model: str) -> None:
    """Raises at once for a model name that cannot resolve (the load itself runs later)."""
    from softprompt.models import ModelNotInstalledError, resolve_model_source

    with contextlib.suppress(ModelNotInstalledError):  # a cached conversion may still load
        resolve_model_source(model)


def build_app(model: str, tasks: dict[str, str | list[str]], prompts_dir: str | Path | None = None,
              *, admin_key: str | None = None, max_batch_size: int = 32, max_wait_ms: float = 5,
              max_queue: int = 256, request_timeout_s: float = 30, device: str = "cpu") -> Any:
    """Builds the app; the engine itself loads in the background once the server starts.

    Args and Raises: as :func:`serve` (without host, port and log level).
    """
    _, create_app = _import_serving()
    from softprompt.server.app import ServerSettings

    missing = [f"{name}={path}" for name, paths in tasks.items()
               for path in ([paths] if isinstance(paths, (str, Path)) else paths)
               if not Path(path).is_dir()]
    if missing:  # fail before the slow model load, not in the background after it
        raise FileNotFoundError("prompt checkpoint directories not found: " + ", ".join(missing))
    _check_model_name(model)
    settings = ServerSettings(
        prompts_dir=prompts_dir, admin_key=admin_key, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout_s=request_timeout_s,
        tasks=dict(tasks))

    def make_engine() -> Any:
        from softprompt.inference import Engine

        return Engine(model, device=device)

    return create_app(make_engine, settings)


def serve(model: str, tasks: dict[str, str | list[str]], prompts_dir: str | Path | None = None,
          host: str = "127.0.0.1", port: int = 8000, admin_key: str | None = None,
          max_batch_size: int = 32, max_wait_ms: float = 5, max_queue: int = 256,
          request_timeout_s: float = 30, device: str = "cpu", log_level: str = "info") -> None:
    """Serves prompt-tuned tasks over one frozen model until interrupted.

    The HTTP port opens at once; ``GET /health`` answers 503 until the model and the tasks have
    loaded, then 200.

    Args:
        model: Model name (e.g. ``smollm2-135m``), local folder, or GGUF file.
        tasks: Task name -> prompt checkpoint directory (a list makes an ensemble).
        prompts_dir: Directory ``POST /v1/tasks`` may load new tasks from; None disables it.
        host: Interface to bind; a non-loopback address exposes the server to the network.
        port: TCP port.
        admin_key: Key for ``POST/DELETE /v1/tasks``; None reads ``SOFTPROMPT_ADMIN_KEY``, and
            with neither set the admin endpoints answer 403.
        max_batch_size: Inputs per engine batch at most.
        max_wait_ms: How long a batch waits for more inputs after its first.
        max_queue: Inputs waiting at once; beyond it requests get 429.
        request_timeout_s: Seconds before a waiting request gets 504.
        device: Torch device for the model.
        log_level: uvicorn's log level.

    Raises:
        FileNotFoundError: A task's checkpoint directory or the model path does not exist.
        ValueError: Invalid settings, or a model name that is neither bundled nor a path.
        ImportError: fastapi/uvicorn are not installed.
    """
    uvicorn, _ = _import_serving()
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    app = build_app(model, tasks, prompts_dir, admin_key=admin_key, max_batch_size=max_batch_size,
                    max_wait_ms=max_wait_ms, max_queue=max_queue,
                    request_timeout_s=request_timeout_s, device=device)
    if not _is_loopback(host):
        logger.warning("binding %s: the server is reachable from the network%s", host,
                       "" if admin_key else " (admin endpoints are disabled: no admin key)")
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=int(request_timeout_s) + 5)


def _task_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def parse_tasks(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Turns repeated ``NAME=DIR`` pairs into a task map; a repeated name becomes an ensemble."""
    tasks: dict[str, list[str]] = {}
    for name, path in pairs:
        tasks.setdefault(name, []).append(path)
    return {name: paths[0] if len(paths) == 1 else paths for name, paths in tasks.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m softprompt.server.run --model M --task NAME=DIR ...``."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.server.run",
                                     description="Serve prompt-tuned tasks over one model.")
    parser.add_argument("--model", required=True, help="model name, folder or GGUF file")
    parser.add_argument("--task", type=_task_arg, action="append", default=[],
                        metavar="NAME=DIR", help="task to load (repeat; same name = ensemble)")
    parser.add_argument("--prompts-dir", help="directory POST /v1/tasks may load from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-key", help=f"admin key (default: ${ADMIN_KEY_ENV})")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(args.model, parse_tasks(args.task), args.prompts_dir, host=args.host, port=args.port,
          admin_key=args.admin_key, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          request_timeout_s=args.request_timeout, device=args.device, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Admin authentication and prompt-path confinement for the task-management endpoints.

Two rules guard ``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}``:

* The caller must present the admin key, as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
  With no key configured the endpoints are off (403), so a server is never open by accident.
* A task may only be loaded from a directory inside the configured prompts directory. The path
  must be relative, contain no ``..`` component, and still lie inside the prompts directory
  once every symlink has been resolved.
"""

from __future__ import annotations

import hmac
from pathlib import Path, PurePosixPath, PureWindowsPath

from softprompt.server.options import TASK_NAME_RULE, is_task_name
from softprompt.server.schemas import ApiError


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """Returns the key a request presents, from ``Authorization: Bearer`` or ``X-API-Key``."""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def check_admin(configured_key: str | None, authorization: str | None,
                x_api_key: str | None) -> None:
    """Raises unless the request carries the configured admin key.

    Args:
        configured_key: The server's admin key; None or empty disables admin endpoints.
        authorization: The ``Authorization`` header, if any.
        x_api_key: The ``X-API-Key`` header, if any.

    Raises:
        ApiError: 403 when admin endpoints are disabled, 401 when the key is missing or wrong.
    """
    if not configured_key:
        raise ApiError(403, "admin endpoints disabled: start the server with --admin-key "
                            "(or SOFTPROMPT_ADMIN_KEY) to enable them", "admin_disabled",
                       error_type="permission_error")
    key = presented_key(authorization, x_api_key)
    if key is None:
        raise ApiError(401, "missing admin key: send 'Authorization: Bearer KEY' or "
                            "'X-API-Key: KEY'",
                       "unauthorized", error_type="authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})
    # compare_digest: the time taken does not reveal how much of the key matched.
    if not hmac.compare_digest(key.encode("utf-8"), configured_key.encode("utf-8")):
        raise ApiError(401, "invalid admin key", "unauthorized", error_type="authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})


def check_task_name(name: str) -> str:
    """Returns ``name`` if it is a valid task name, else raises a 400 :class:`ApiError`."""
    if not is_task_name(name):
        raise ApiError(400, f"invalid task name {name!r}: use {TASK_NAME_RULE}",
                       "invalid_task_name", param="name")
    return name


def resolve_prompt_path(prompts_dir: str | Path | None, relative: str) -> Path:
    """Resolves a client-supplied checkpoint path inside ``prompts_dir``.

    Args:
        prompts_dir: The directory tasks may be loaded from; None disables loading.
        relative: The path the client sent, relative to ``prompts_dir``.

    Returns:
        The fully resolved checkpoint directory (no symlinks left in it).

    Raises:
        ApiError: 403 when loading is disabled or the path escapes ``prompts_dir`` through a
            symlink; 400 when the path is absolute, has a ``..`` component, is malformed or is
            not an existing directory.
    """
    if prompts_dir is None:
        raise ApiError(403, "loading tasks is disabled: start the server with --prompts-dir",
                       "prompts_dir_disabled", error_type="permission_error", param="path")
    if not relative or "\x00" in relative:
        raise ApiError(400, "path must be a non-empty relative path", "path_rejected", param="path")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if (posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root
            or relative.startswith("~")):
        raise ApiError(400, f"path {relative!r} must be relative to the prompts directory",
                       "path_rejected", param="path")
    if ".." in posix.parts or ".." in windows.parts:
        raise ApiError(400, f"path {relative!r} must not contain '..'", "path_rejected",
                       param="path")
    root = Path(prompts_dir).resolve()
    try:
        candidate = (root / relative).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ApiError(400, f"no prompt directory {relative!r} in the prompts directory",
                       "path_not_found", param="path") from None
    except (OSError, RuntimeError) as error:  # symlink loops, permissions
        raise ApiError(400, f"cannot resolve path {relative!r}: {error}", "path_rejected",
                       param="path") from None
    if not candidate.is_relative_to(root):
        raise ApiError(403, f"path {relative!r} resolves outside the prompts directory",
                       "path_escape", error_type="permission_error", param="path")
    if not candidate.is_dir():
        raise ApiError(400, f"path {relative!r} is not a directory", "path_not_found", param="path")
    return candidate

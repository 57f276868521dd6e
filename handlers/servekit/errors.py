"""Errors a request can end in, each carrying its HTTP status, and their one JSON form.

The status lives on the class (as BentoML and KServe do); :func:`error_body` is the one place
that turns any exception into the JSON a client sees, so REST, gRPC and Triton answer alike.
"""

from __future__ import annotations

import importlib
import logging
import re
from http import HTTPStatus
from typing import Any, ClassVar

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


class KitError(Exception):
    """Base of every error the kit answers a request with."""

    status: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(KitError):
    """The request is malformed: not an image, bad JSON, bad base64, missing field."""

    status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(KitError):
    """The image is over the byte or pixel limit of the model."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(KitError):
    """The bytes are an image, but of a format this model does not accept."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class NotReady(KitError):
    """The model cannot answer now (not loaded yet)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class ConfigError(ValueError):
    """A model's configuration is invalid; raised when an archive is built or loaded."""


def plain_line(text: str) -> str:
    """The first line of ``text`` without terminal escape codes or control characters."""
    lines = [line.strip() for line in _ESCAPES.sub("", text).splitlines() if line.strip()]
    return lines[0] if lines else ""


INTERNAL_MESSAGE = "internal error while running the model; the server log has the details"


def status_of(exc: BaseException) -> int:
    """Return the HTTP status a request that failed with ``exc`` is answered with."""
    return int(exc.status) if isinstance(exc, KitError) else int(HTTPStatus.INTERNAL_SERVER_ERROR)


def error_body(exc: BaseException) -> dict[str, Any]:
    """Return the JSON body ``{"error": ..., "code": ...}`` for a failed request.

    5xx bodies never carry the exception's text, which may hold internals; the log does.
    """
    code = status_of(exc)
    message = exc.message if isinstance(exc, KitError) and code < 500 else INTERNAL_MESSAGE
    if isinstance(exc, NotReady):
        message = exc.message
    return {"error": message, "code": code}


def require(package: str, why: str, *, install: str = "pip install -r requirements.txt") -> Any:
    """Import an optional package (timm, transformers) or module of one (``executorch.runtime``) when a model
    needs it, or fail in one line naming the package and how to install it.

    torchao's import logs a deprecation of torch's at WARNING, of torchao's own making (an Enum's
    ``register_constant``); transformers imports torchao lazily, on the first use of one of its classes, so that
    line is filtered out of torch's pytree logger from here on (``TorchaoEnumNote``), not only during the import.

    Raises:
        ConfigError: the package is not installed in this Python.
    """
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, TorchaoEnumNote) for f in pytree.filters):
        pytree.addFilter(TorchaoEnumNote())
    try:
        return importlib.import_module(package)
    except ImportError:
        name = package.partition(".")[0]
        raise ConfigError(f"{why} needs the Python package '{name}', which this Python lacks: {install}") from None


class TorchaoEnumNote(logging.Filter):
    """Drops torch's note that registering an Enum subclass as a pytree constant is deprecated (torchao does it
    at import); every other line of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()

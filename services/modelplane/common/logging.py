"""structlog configuration: JSON for collectors, key-value for people, one context per request.

Every line names its service (so the interleaved output of `modelplane up`, or one collector fed
by every pod, stays attributable) and, while a request is handled, its request id (bound by the
gRPC interceptor and the gateway middleware). Lines of libraries that use the standard logging
module get the same fields and the same renderer.
"""

from __future__ import annotations

import logging
import sys

import structlog

from modelplane.common.settings import LoggingSettings


def _naming(service: str) -> structlog.typing.Processor:
    def add_service(_logger: object, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.setdefault("service", service)
        return event

    return add_service


def configure_logging(service: str, settings: LoggingSettings | None = None) -> None:
    settings = settings or LoggingSettings()
    level = getattr(logging, settings.level.upper())
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        # A processor rather than a context variable: threads and tasks started anywhere carry it.
        _naming(service),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (print() makes two under PYTHONUNBUFFERED): the services of `modelplane
        # up` share one stderr, and a line must never be split by another process's line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that use the standard logging module (uvicorn, alembic) go through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that narrate their own start-up are heard only when something is wrong.
    for noisy in ("alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))

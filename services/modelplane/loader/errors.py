"""The loader's errors. Each message names the file or setting at fault and what to do."""

from __future__ import annotations

from modelplane.common.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "BudgetExceeded",
    "ChecksumMismatch",
    "ConversionFailed",
    "LoadCancelled",
    "LoadTimedOut",
    "ModelNotFound",
    "NotAModel",
    "PackageRefused",
    "SourceUnavailable",
    "TritonLoadFailed",
    "TritonUnavailable",
    "UnsupportedSource",
]


class PackageRefused(FailedPrecondition):
    """The package is not what it must be; nothing of it is loaded. Base of the refusals below."""

    reason = "PACKAGE_REFUSED"


class ChecksumMismatch(PackageRefused):
    reason = "CHECKSUM_MISMATCH"


class NotAModel(PackageRefused):
    reason = "NOT_A_MODEL"


class ConversionFailed(PackageRefused):
    reason = "CONVERSION_FAILED"


class SourceUnavailable(FailedPrecondition):
    reason = "SOURCE_UNAVAILABLE"


class UnsupportedSource(InvalidArgument):
    reason = "UNSUPPORTED_SOURCE"


class TritonLoadFailed(FailedPrecondition):
    reason = "TRITON_LOAD_FAILED"


class TritonUnavailable(Unavailable):
    reason = "TRITON_UNAVAILABLE"


class LoadTimedOut(DeadlineExceeded):
    reason = "LOAD_TIMED_OUT"


class LoadCancelled(Cancelled):
    reason = "LOAD_CANCELLED"


class BudgetExceeded(ResourceExhausted):
    reason = "BUDGET_EXCEEDED"

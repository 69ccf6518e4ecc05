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
    "CacheFull",
    "ChecksumMismatch",
    "ConversionFailed",
    "LoadCancelled",
    "LoadTimedOut",
    "ManifestMismatch",
    "ModelNotFound",
    "NotAModel",
    "PackageRefused",
    "PreloadStoodDown",
    "QuotaExceeded",
    "SignatureRefused",
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


class ManifestMismatch(PackageRefused):
    """A file the manifest lists is missing from the package, or the package holds one it does not."""

    reason = "MANIFEST_MISMATCH"


class SignatureRefused(PackageRefused):
    """The manifest's signature is missing where one is required, or matches no trusted key."""

    reason = "SIGNATURE_REFUSED"


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


class PreloadStoodDown(Cancelled):
    """A preload gave way to an operator who unloaded the model; who joined it loads it anew."""

    reason = "PRELOAD_STOOD_DOWN"


class CacheFull(ResourceExhausted):
    """The cache's disk or byte budget cannot take the package, even after evicting what it may."""

    reason = "CACHE_FULL"


class BudgetExceeded(ResourceExhausted):
    reason = "BUDGET_EXCEEDED"


class QuotaExceeded(ResourceExhausted):
    """A loaded model measured more memory than its quota allows; it was unloaded."""

    reason = "MEMORY_QUOTA_EXCEEDED"

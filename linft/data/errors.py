"""Data-layer errors: each is a :class:`~linft.errors.LinftError` with one readable message."""
from linft.errors import LinftError


class DataError(LinftError):
    """A dataset that is missing, misshapen or unreadable (root, domain, class folders, files)."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (truncated, not an image); the message names the file."""


class DownloadError(DataError):
    """A download that failed, or whose target is in a state linft will not overwrite."""


class ChecksumError(DownloadError):
    """A downloaded or local file whose checksum differs from the known one."""


class UnsafeArchiveError(DownloadError):
    """An archive entry that would land outside the extraction folder (absolute, ``..``, symlink)."""

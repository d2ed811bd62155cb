"""Keeping secrets (the API token, passwords in store and Grafana URLs) out of files, messages and logs.

    redact_url(url)              the password of one URL replaced by ***
    redact_text(text, secrets)   the same for every URL inside free text, plus the given literal secrets
    write_private(path, text)    a file readable by its owner only, from the moment it exists (mode 0600)
    RedactingFilter              a logging.Filter that applies redact_text to every record it sees
    install_log_redaction(...)   puts one RedactingFilter on every handler of a logger (the root by default)
    protect_process_logs(...)    the same for a whole process nobody configured logging in (a Ray actor)
    url_password(url)            the password a URL carries ("" if none), to hide it where it appears alone

Standard library only. Redaction errs on the side of hiding too much: in `scheme://user:secret@host`, everything
between the first ':' of the user part and the last '@' of the (whitespace-free) token is the password.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

MASK = "***"

# scheme://[user]:password@...  The password may hold anything but whitespace and quotes; the greedy match ends at
# the token's last '@', so a password with an unescaped '@' in it is still hidden completely. Bounded repeats keep
# the work linear in the text's length whatever it holds.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]{0,31}://[^\s:/@'\"<>]{0,256}:)(?P<password>[^\s'\"<>]{1,4096})(?P<tail>@)")
# Only in redact_url (in free text "a:b@c" is too often no credential): user:password@host with no scheme.
_SCHEMELESS = re.compile(r"\A(?P<head>[^\s:/@]{0,256}:)(?P<password>\S{1,4096})(?P<tail>@)(?=[^@]*\Z)")
# libpq/ODBC style and query-string credentials: password=..., pwd=..., token=..., api_key=..., client_secret=...
_KEY_VALUE = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_])[A-Za-z0-9_]{0,64}?(?:password|passwd|pwd|token|api_key|apikey|secret)\s*=\s*)"
    r"(?P<value>'[^'\n]{0,4096}'|\"[^\"\n]{0,4096}\"|[^\s&;,'\"<>)]+)",
    re.IGNORECASE)


def _mask_url_password(m: re.Match[str]) -> str:
    return f"{m['head']}{MASK}{m['tail']}"


def _mask_value(m: re.Match[str]) -> str:
    v = m["value"]
    if v.strip("'\"") in ("", MASK):
        return m[0]
    q = v[0] if v[:1] in ("'", '"') else ""
    return f"{m['head']}{q}{MASK}{q}"


def redact_url(url: str) -> str:
    """`url` with its password (and any password=/token= query value) replaced by ***; anything else unchanged.

    Never raises: URLs without a password, SQLite paths and text that is no URL at all come back as they were.
    """
    text = url if isinstance(url, str) else str(url)
    if "://" not in text:  # user:password@host/db without a scheme
        text = _SCHEMELESS.sub(_mask_url_password, text)
    return _KEY_VALUE.sub(_mask_value, _URL_PASSWORD.sub(_mask_url_password, text))


def url_password(url: str) -> str:
    """The password in `url` (`scheme://user:password@host...`), or "" if it holds none."""
    text = url if isinstance(url, str) else str(url)
    m = _URL_PASSWORD.search(text) if "://" in text else _SCHEMELESS.search(text)
    return m["password"] if m else ""


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every literal in `secrets` (empty ones ignored) and the password of every URL inside it
    replaced by ***."""
    out = text if isinstance(text, str) else str(text)
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):
        out = out.replace(s, MASK)
    return redact_url(out)


def write_private(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Create or replace `path` with `text`, readable and writable by the owner only (0600).

    The data goes to a new temporary file in the same directory, created with O_EXCL and mode 0600 (never visible
    with wider permissions, not even between create and chmod), flushed to disk, then renamed over `path`: readers
    see the old file or the whole new one, never a torn one.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file next to {target}")
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask (which can only have removed bits)
            with os.fdopen(fd, "w", encoding=encoding) as f:
                fd = -1
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if fd != -1:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; best effort (not every platform or file system can fsync a directory)
        dfd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class RedactingFilter(logging.Filter):
    """Redacts URL passwords (and the literal secrets it was given) in log records, message and traceback alike.

    Put it on handlers (see install_log_redaction): a filter on a logger does not see records from its children.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = {s for s in secrets if s}

    def add_secret(self, secret: str) -> None:
        if secret:
            self.secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a malformed record: the handler reports it as logging always does
            return True
        redacted = redact_text(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


def install_log_redaction(logger: logging.Logger | None = None, secrets: Iterable[str] = (),
                          flt: RedactingFilter | None = None) -> RedactingFilter:
    """Add a RedactingFilter (`flt`, else the one already there, else a new one) to every handler of `logger`
    (default: the root logger) and return it, so that secrets learned later can be added with add_secret.
    Idempotent. Handlers added to the logger afterwards are not covered: install after configuring logging."""
    logger = logger if logger is not None else logging.getLogger()
    existing = next((f for h in logger.handlers for f in h.filters if isinstance(f, RedactingFilter)), None)
    flt = flt or existing or RedactingFilter()
    for s in secrets:
        flt.add_secret(s)
    for h in logger.handlers:
        if flt not in h.filters:
            h.addFilter(flt)
    return flt


def protect_process_logs(secrets: Iterable[str] = ()) -> RedactingFilter:
    """Redaction for a whole process whose logging nobody else configures (the controller's and the agents' Ray
    actors): one RedactingFilter, knowing `secrets`, on every handler of the root logger and of every other logger
    that has handlers of its own (uvicorn's, Ray's). A root logger without handlers would hand records to
    logging.lastResort, which no filter reaches, so it first gets a stderr handler at lastResort's level (WARNING).
    Idempotent: call it again with secrets learned later or after more handlers were made."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    flt = install_log_redaction(root, secrets)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            install_log_redaction(logger, flt=flt)
    return flt

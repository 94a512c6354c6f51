"""API keys of the proxy: the one ``ponder serve`` requires, what a key may hold, and checking
a request's bearer token against it."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from starlette.requests import Request

from controller.parse import HTTPError
from features.errors import ConfigError

__all__ = ["check_bearer", "check_key_text", "resolve_api_key"]


def check_key_text(key: str, source: str) -> None:
    """Refuse a key (named ``source`` in the error) that is blank or no HTTP header can carry."""
    if not key.strip():
        raise ConfigError(
            f"{source} is empty: give the key clients must send, or leave out both --api-key "
            "and $PONDER_API_KEY to serve without one"
        )
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
        raise ConfigError(
            f"{source} holds white space, control or non-ASCII characters: an HTTP header "
            "cannot carry it as sent; use printable ASCII only"
        )


def resolve_api_key(
    flag: str | None, environ: Mapping[str, str], argv: Sequence[str] = ()
) -> str | None:
    """The key ``ponder serve`` requires: ``--api-key``, else ``$PONDER_API_KEY``.

    Serving without a key is a choice made by giving neither; a key that is given but empty
    (``--api-key ""``, an unset variable expanded into the flag, ``PONDER_API_KEY=``) is refused,
    so that a mistake never opens the server.

    Raises:
        ConfigError: an empty key, or one no HTTP header can carry.
    """
    if flag is None and any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        # (tyro reads the word None as no value: a flag that was given is never "no key")
        raise ConfigError(
            "--api-key None does not turn the key off: leave out --api-key (and "
            "$PONDER_API_KEY) to serve without one"
        )
    if flag is not None:
        check_key_text(flag, "--api-key")
        return flag
    if "PONDER_API_KEY" in environ:
        key = environ["PONDER_API_KEY"]
        check_key_text(key, "$PONDER_API_KEY")
        return key
    return None


def check_bearer(request: Request, api_key: str | None) -> None:
    """Check a request's ``Authorization: Bearer`` token against ``api_key`` (``None``: open).

    Raises:
        HTTPError: a 401 for a missing or wrong key.
    """
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            "invalid_request_error",
            "invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise HTTPError(
            401, "incorrect API key provided", "invalid_request_error", "invalid_api_key"
        )

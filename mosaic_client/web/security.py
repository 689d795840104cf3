"""Who may use the web view: whoever holds the token printed at start-up, from this origin.

The server listens on the loopback interface by default, but any local user (and any web page
the user visits, through the browser) can reach a loopback port. So:

* every request must carry the token: ``?token=`` on the first visit (the server then sets a
  ``SameSite=Strict`` cookie and redirects to the URL without it), the cookie afterwards, or the
  ``X-Mosaic-Token`` header;
* a request that changes anything (POST) must carry the token in the header, which a cross-site
  page cannot set without a CORS preflight this server never grants, and its ``Origin`` and
  ``Sec-Fetch-Site`` (when the browser sends them) must say it comes from this server's pages;
* on a loopback bind the ``Host`` header must name the loopback exactly (``localhost`` or a
  loopback address, never a name such as ``127.evil.example``), which defeats DNS rebinding.

Only the standard library here, so the checks are unit-tested without the web stack.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Mapping
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

TOKEN_HEADER = "x-mosaic-token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
SAFE_METHODS = frozenset({"GET", "HEAD"})


def new_token() -> str:
    """A random token with 192 bits of entropy, URL-safe."""
    return secrets.token_urlsafe(24)


def cookie_name(port: int) -> str:
    # Cookies are shared across ports of one host: two users' servers on 127.0.0.1 must not
    # overwrite each other's cookie.
    return f"mosaic_token_{port}"


def matches(token: str, candidate: str | None) -> bool:
    return candidate is not None and hmac.compare_digest(token.encode(), candidate.encode())


def query_token(query_string: str) -> str | None:
    values = parse_qs(query_string).get("token")
    return values[0] if values else None


def cookie_token(cookie_header: str | None, name: str) -> str | None:
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except Exception:  # a malformed Cookie header is just no token
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


def is_loopback(host: str) -> bool:
    """An exact loopback name, or a literal loopback address (127.0.0.0/8, ::1).

    Only literal addresses, checked with `ipaddress`: a name that merely starts with "127."
    (127.evil.example) is a DNS name its owner controls, the very thing rebinding exploits.
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(literal).is_loopback
    except ValueError:
        return False


# A Host header: a name or IPv4 literal, or a bracketed IPv6 literal, then an optional port.
# Nothing else (no userinfo "@", no path, no second colon) reaches the loopback check.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def host_allowed(host_header: str | None, bind_host: str) -> bool:
    """On a loopback bind, only Host: localhost / a loopback address (any port) is served."""
    if not is_loopback(bind_host):
        return True  # an explicit --host: the token alone guards it (docs/web.md)
    match = _HOST_HEADER.fullmatch(host_header or "")
    return match is not None and is_loopback(match.group(1))


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a state-changing request comes from this server's own pages.

    ``Sec-Fetch-Site`` is set by every current browser and cannot be forged by a page; ``Origin``
    is sent with every cross-origin POST. A client that sends neither is not a browser (curl, a
    script): it still needs the token in the header.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        if origin in ("null", "") or urlsplit(origin).netloc != host:
            return False
    return True


def refusal(
    method: str,
    path: str,
    query_string: str,
    headers: Mapping[str, str],
    token: str,
    port: int,
    bind_host: str,
) -> str | None:
    """Why this request is refused, or None when it may go on. `headers` are lower-cased."""
    if not host_allowed(headers.get("host"), bind_host):
        return "unexpected Host header (this server answers only on the loopback)"
    header = headers.get(TOKEN_HEADER)
    if method not in SAFE_METHODS:
        if not matches(token, header):
            return "a request that changes something needs the token in the X-Mosaic-Token header"
        if not same_origin(headers):
            return "cross-site request refused"
        return None
    if matches(token, header) or matches(token, query_token(query_string)):
        return None
    if matches(token, cookie_token(headers.get("cookie"), cookie_name(port))):
        return None
    return "missing or wrong token: open the URL `mosaic web` printed (it ends with ?token=...)"

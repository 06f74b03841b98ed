"""Who may do what at the gate: users, roles, bearer tokens and the one decision every way in asks.

Trial platforms (Flywheel, LORIS, XNAT) scope every account to its site; so does this. Five roles:

==================  =========================================================================
site_uploader       uploads for its own site and sees that site's pages
site_coordinator    sees its own site and answers its queries
central_monitor     sees every site, opens, accepts and returns queries, reads the reports
reader              the validation reports only, read-only (statisticians, regulatory writers)
admin               everything, including users
==================  =========================================================================

A user signs in with a bearer token (``Authorization: Bearer ...`` on STOW-RS, or the sign-in
form of the dashboard, which then keeps a signed session cookie). Tokens are 256-bit random
strings shown once; the database keeps their SHA-256 only (a high-entropy token needs no slow
hash: the same practice as GitHub's and PyPI's API tokens). The upload tokens of the intake YAML
(``sites.<site>.http_token_sha256``) keep working: each is a site_uploader of that site.

:func:`allowed` is pure decision logic (as :mod:`sitebench.qc.gate` is for verdicts); storage is
:class:`UserStore`; the audit records of sign-ins and refusals are written by the callers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from sitebench.errors import SitebenchError
from sitebench.provenance import utc_now

__all__ = ["ACTIONS", "ROLES", "AccessDenied", "Principal", "UserStore", "allowed", "token_digest", "valid_site_name"]

ROLES = ("site_uploader", "site_coordinator", "central_monitor", "reader", "admin")
#: roles bound to one site (the others see the whole trial, or only the reports)
SITE_ROLES = frozenset({"site_uploader", "site_coordinator"})
ACTIONS = ("upload", "view_site", "answer_query", "manage_query", "view_reports", "manage_users")

#: action -> roles that may take it; for SITE_ROLES only on their own site
_GRANTS: dict[str, frozenset[str]] = {
    "upload": frozenset({"site_uploader", "admin"}),
    "view_site": frozenset({"site_uploader", "site_coordinator", "central_monitor", "admin"}),
    "answer_query": frozenset({"site_coordinator", "admin"}),
    "manage_query": frozenset({"central_monitor", "admin"}),
    "view_reports": frozenset({"central_monitor", "reader", "admin"}),
    "manage_users": frozenset({"admin"}),
}

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_PREFIX = "sbk_"


class AccessDenied(SitebenchError):
    """A signed-in user tried what their role or site does not allow (HTTP 403; audited by the caller)."""


def valid_site_name(name: str) -> bool:
    """A site name that is safe as one path component: letters, digits, ``._-``, never ``..``.

    Site names reach folders (the watched drop folder) and URLs; one like ``../S02`` or ``S01/x``
    must never select another place in the store."""
    return bool(_SITE_NAME.fullmatch(name or "")) and ".." not in name


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh 256-bit bearer token, shown once; only :func:`token_digest` of it is kept."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user of the database, or a site's upload token from the YAML."""

    name: str
    role: str
    site: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.role}{' of ' + self.site if self.site else ''})"


def allowed(principal: Principal | None, action: str, site: str | None = None) -> bool:
    """Whether ``principal`` may take ``action`` (on ``site``, where the action concerns one).

    A site-bound role acts on its own site only; an action on no particular site (the trial
    overview, say) is open to site roles only as their own site's view, so ``site`` is required."""
    if principal is None or action not in _GRANTS:
        return False
    if principal.role not in _GRANTS[action]:
        return False
    if principal.role in SITE_ROLES:
        return site is not None and principal.site == site
    return True


class UserStore:
    """Users in the QC database (table ``users``): create, authenticate, rotate, disable."""

    def __init__(self, records) -> None:
        from sitebench.qc.records import users

        self._engine = records.engine
        self._users = users

    def create(self, username: str, role: str, site: str | None = None, *, sites: Iterable[str] = ()) -> str:
        """A new user; returns its token, shown once (only its SHA-256 is kept)."""
        self._check(username, role, site, sites)
        token = new_token()
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(self._users).values(
                    username=username, role=role, site=site if role in SITE_ROLES else None,
                    token_sha256=token_digest(token), created_utc=utc_now(), disabled=False))
        except IntegrityError:
            raise SitebenchError(f"user {username!r} already exists") from None
        return token

    def rotate(self, username: str) -> str:
        """A new token for ``username``; the old one (and every session signed with it) stops working."""
        token = new_token()
        with self._engine.begin() as conn:
            done = conn.execute(update(self._users).where(self._users.c.username == username)
                                .values(token_sha256=token_digest(token), disabled=False)).rowcount
        if not done:
            raise SitebenchError(f"no user {username!r}")
        return token

    def disable(self, username: str) -> None:
        with self._engine.begin() as conn:
            if not conn.execute(update(self._users).where(self._users.c.username == username)
                                .values(disabled=True)).rowcount:
                raise SitebenchError(f"no user {username!r}")

    def list(self) -> list[dict]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(self._users.c.username, self._users.c.role, self._users.c.site,
                                       self._users.c.created_utc, self._users.c.disabled)
                                .order_by(self._users.c.username)).mappings().all()
        return [dict(r) for r in rows]

    def count(self) -> int:
        from sqlalchemy import func

        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self._users)).scalar_one())

    def authenticate(self, token: str | None) -> Principal | None:
        """The enabled user holding ``token``, or None. Looked up by the token's SHA-256: the lookup's
        timing depends on the digest, never on how much of a guessed token was right."""
        if not token:
            return None
        digest = token_digest(token)
        with self._engine.connect() as conn:
            row = conn.execute(select(self._users).where(self._users.c.token_sha256 == digest)).mappings().first()
        if row is None or row["disabled"] or not hmac.compare_digest(row["token_sha256"], digest):
            return None
        return Principal(name=row["username"], role=row["role"], site=row["site"])

    def session_fingerprint(self, username: str) -> str | None:
        """What a session cookie binds to: part of the token's digest, so rotating the token or
        disabling the user ends every session signed before."""
        with self._engine.connect() as conn:
            row = conn.execute(select(self._users.c.token_sha256, self._users.c.disabled)
                               .where(self._users.c.username == username)).first()
        return None if row is None or row[1] else row[0][:16]

    def session_principal(self, username: str, fingerprint: str) -> Principal | None:
        """The enabled user a session cookie names, if the cookie's fingerprint is still theirs
        (:meth:`session_fingerprint`): one lookup per page."""
        with self._engine.connect() as conn:
            row = conn.execute(select(self._users).where(self._users.c.username == username)).mappings().first()
        if row is None or row["disabled"] or not hmac.compare_digest(row["token_sha256"][:16], fingerprint):
            return None
        return Principal(row["username"], row["role"], row["site"])

    def principal(self, username: str) -> Principal | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(self._users).where(self._users.c.username == username)).mappings().first()
        return None if row is None or row["disabled"] else Principal(row["username"], row["role"], row["site"])

    @staticmethod
    def _check(username: str, role: str, site: str | None, sites: Iterable[str]) -> None:
        if not _USERNAME.fullmatch(username or ""):
            raise SitebenchError(f"user name {username!r}: use letters, digits and ._@- (at most 64)")
        if role not in ROLES:
            raise SitebenchError(f"role {role!r}: one of {', '.join(ROLES)}")
        if role in SITE_ROLES:
            if not site:
                raise SitebenchError(f"a {role} belongs to one site: give --site")
            known = set(sites)
            if known and site not in known:
                raise SitebenchError(f"site {site!r} is not in the intake configuration ({', '.join(sorted(known))})")
        elif site:
            raise SitebenchError(f"a {role} sees the whole trial: no --site")

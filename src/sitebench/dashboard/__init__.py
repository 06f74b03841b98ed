"""The trial operations dashboard served by ``sitebench qc serve``: sign-in, trial overview, site,
series and query pages. Server-rendered HTML (Jinja2), no JavaScript and nothing loaded from
elsewhere; every page behind a signed session and scoped to what the user's role and site allow.

It sits above ``qc`` (and beside ``reports``) and adds its routes to the gate's HTTP app through
:func:`mount`, so the gate itself never imports it.
"""

from sitebench.dashboard.app import mount

__all__ = ["mount"]

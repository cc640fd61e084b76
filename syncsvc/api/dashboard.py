"""The operator dashboard's routes, mounted like every API module (the page and its handlers
live in ``syncsvc/dashboard/``)."""

from syncsvc.dashboard.views import routes

__all__ = ["routes"]

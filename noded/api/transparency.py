"""The route modules of the transparency feature, in the order the daemon adds them."""

from __future__ import annotations

from noded.api import dashboard, locate, metrics, mirrors, reports, traffic
from noded.api.app import RouteSetup

ROUTES: list[RouteSetup] = [mirrors.setup, traffic.setup, reports.setup, locate.setup, metrics.setup, dashboard.setup]

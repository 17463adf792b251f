"""Figures and static pages."""

from interp.viz.dashboard import build_dashboard, dashboard_data, dashboard_from_folder, write_page

__all__ = ["build_dashboard", "dashboard_data", "dashboard_from_folder", "write_page"]

"""Figures and static pages."""

from interp.viz.dashboard import example_html, latent_section, write_dashboard

__all__ = ["example_html", "latent_section", "write_dashboard"]

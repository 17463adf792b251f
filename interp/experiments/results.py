"""An experiment's results folder: JSON files, tables, and figures as HTML (offline) and PNG."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from interp.paths import atomic_write, write_text


class Results:
    """Files of one run under ``root``: ``write_json``, ``figure`` (HTML + PNG), ``path``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._png_problems: dict[str, str] = {}

    def path(self, *parts: str) -> Path:
        """A path inside the folder (parent folders created)."""
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, name: str, value: Any) -> Path:
        return write_text(self.path(name), json.dumps(value, indent=1, default=_plain))

    def figure(self, name: str, fig: Any, *, width: int = 1100, height: int | None = None) -> Path:
        """Write ``figures/NAME.html`` (plotly.min.js beside it: works offline) and ``figures/NAME.png``.

        The PNG needs kaleido and a Chrome/Chromium (kaleido finds Debian's ``chromium`` on the PATH,
        or the one ``BROWSER_PATH`` names); without them the HTML is still written and the problem
        is recorded in ``metrics.json`` under ``png_problems``.
        """
        html = self.path("figures", f"{name}.html")
        atomic_write(html, lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
        png = html.with_suffix(".png")
        try:
            atomic_write(png, lambda tmp: fig.write_image(tmp, format="png", width=width, height=height or fig.layout.height or 500, scale=1))
        except Exception as err:  # kaleido missing, or no browser it can start
            message = f"{type(err).__name__}: {err}".splitlines()[0]
            self._png_problems[name] = message
            warnings.warn(f"{png} not written ({message}); see interp.experiments.results.Results.figure", stacklevel=2)
        return html

    def figure_problems(self) -> dict[str, Any]:
        return {"png_problems": dict(self._png_problems)} if self._png_problems else {}


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars / arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

"""Job configs are dataclasses; ``opt`` adds the help text the CLI is generated from."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interp.errors import InputError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, argument: bool = False, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with CLI help. ``parse`` turns CLI text into the value (e.g. "2M" -> 2000000)."""
    return dataclasses.field(default=default, metadata={"help": help, "argument": argument, "parse": parse})


def parse_count(text: str | int) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    clean = text.strip().lower().replace("_", "")
    try:
        if clean and clean[-1] in units:
            return int(float(clean[:-1]) * units[clean[-1]])
        return int(clean)
    except ValueError:
        raise InputError(f"{text!r} is not a count (examples: 4096, 500k, 2M)") from None


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all', '3', '0,5,29' or '10-20' -> a list of layers, each checked against ``n_layers``."""
    if text.strip() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise InputError(f"layers {text!r}: use all, 3, 0,5,29 or 10-20") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise InputError(f"layers {text!r}: layer {bad[0] if bad else '?'} is out of range 0..{n_layers - 1}")
    return layers


def config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def write_config(config: Any, out: Path) -> None:
    """Write the resolved config of a run as ``out/config.json``."""
    from interp.paths import write_json

    write_json(out / "config.json", config_dict(config), indent=2)

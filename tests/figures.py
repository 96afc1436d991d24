"""Tests' access to the figure a report draws (shared by the report and host-tool tests)."""

from __future__ import annotations

from typing import Any


def captured_figure(monkeypatch: Any) -> dict[str, Any]:
    """A dict that holds, under ``'figure'``, the last matplotlib figure saved while
    ``monkeypatch`` is active (``Figure.savefig`` still writes the file)."""
    from matplotlib.figure import Figure

    captured: dict[str, Any] = {}
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        captured["figure"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return captured

"""Band rules of the live monitor (:mod:`deepwhale.data.monitor`): ``streaming.alerts`` maps
``ppl_median`` and ``drop_rate`` to ``[lo, hi]``; a window whose figure leaves its band lists
the rule in its ``alerts``. This module imports nothing heavy, so that the config can check the
rules when it is parsed."""

from __future__ import annotations


def validate_alerts(alerts) -> None:
    """Check ``streaming.alerts``: ``{"ppl_median" | "drop_rate": [lo, hi]}`` with lo <= hi.

    Raises:
        PipelineConfigError: anything else (the message names the rule).
    """
    from deepwhale.data.config import PipelineConfigError

    if alerts is None:
        return
    if not isinstance(alerts, dict):
        raise PipelineConfigError("streaming.alerts must map ppl_median/drop_rate to [lo, hi]")
    for name, band in alerts.items():
        if name not in ("ppl_median", "drop_rate"):
            raise PipelineConfigError(
                f"streaming.alerts: unknown rule {name!r} (ppl_median, drop_rate)"
            )
        ok = (
            isinstance(band, list | tuple)
            and len(band) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in band)
            and band[0] <= band[1]
        )
        if not ok:
            raise PipelineConfigError(
                f"streaming.alerts.{name} must be [lo, hi] with lo <= hi, got {band!r}"
            )


def check_alerts(summary: dict, bands: dict[str, list[float]]) -> list[str]:
    """The band rules ``summary`` breaks: ``{"ppl_median": [lo, hi], "drop_rate": [lo, hi]}``
    -> messages such as ``"drop_rate 0.8 outside [0, 0.5]"`` (a figure that is None, a
    window without documents or scores, breaks nothing)."""
    values = {"ppl_median": summary["perplexity"]["median"], "drop_rate": summary["drop_rate"]}
    out = []
    for name, (lo, hi) in bands.items():
        v = values[name]
        if v is not None and not lo <= v <= hi:
            out.append(f"{name} {v:.4g} outside [{lo:g}, {hi:g}]")
    return out

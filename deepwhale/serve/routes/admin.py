"""Operations routes: liveness, Prometheus metrics and the live dashboard."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from deepwhale.serve.routes import serving_of

router = APIRouter()
_DASHBOARD_HTML = files("deepwhale.serve").joinpath("dashboard.html").read_text(encoding="utf-8")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the server's metrics."""
    body, content_type = serving_of(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """A live HTML page charting throughput and latency from ``/dashboard/stats``.

    The page itself holds no data and needs no key; it asks for a ``viewer`` or ``admin``
    key when ``/dashboard/stats`` answers 401/403, and keeps it in the tab's sessionStorage.
    """
    return HTMLResponse(_DASHBOARD_HTML, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/stats")
async def dashboard_stats(request: Request) -> dict:
    """Per-second tokens, requests and latency percentiles of the last 300 s (see
    :meth:`deepwhale.serve.stats.LiveStats.snapshot`), plus the model name."""
    serving = serving_of(request)
    return {"model": serving.model_name, **serving.stats.snapshot()}


@router.get("/health")
async def health(request: Request) -> dict:
    """Liveness, with the engine's free slots and waiting requests."""
    serving = serving_of(request)
    engine = serving.model.engine
    return {
        "status": "ok",
        "model": serving.model_name,
        "free_slots": len(engine.free_slots),
        "waiting": len(engine.waiting),
    }

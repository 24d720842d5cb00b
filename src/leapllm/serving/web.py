"""The web pages of `leapllm serve`: a chat playground at / and a live dashboard at /dashboard.

The pages are static files in serving/static/ (no build step; uPlot, the chart library, is vendored
there with its license) that talk to the server like any client: the chat page streams from
/v1/chat/completions, the dashboard polls GET /metrics.json, and with `--reports DIR` lists and
shows the profile and bench reports in DIR (GET /reports, GET /reports/{name}).

With an API key, the pages themselves load (they hold no data) and ask for the key; every endpoint
they read from requires it (auth.py). Every page is sent with a Content-Security-Policy that allows
only this server's own scripts, so no inline script runs, and the scripts insert user and model
text as text, never as HTML.

/metrics.json is the dashboard's view of the server's own metrics (metrics.py): the engine's
counters sampled once a second over the last minutes (MetricsHistory), latency percentiles over a
trailing window, and the model's facts (`leapllm info`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from leapllm.serving.errors import ApiError

STATIC = Path(__file__).parent / "static"
# Scripts and everything else from this server only; styles may be inline (uPlot sizes its canvas
# through element styles, and a profile report's HTML carries its own <style>).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
REPORT_SUFFIXES = {".md": "text/markdown; charset=utf-8", ".json": "application/json",
                   ".html": "text/html; charset=utf-8"}
MAX_REPORT_BYTES = 16 * 2**20


class MetricsHistory:
    """The engine's counters once a second over the last `seconds`, as rates and levels, for charts."""

    def __init__(self, async_engine, metrics, seconds: int = 600, interval: float = 1.0):
        self.async_engine, self.metrics = async_engine, metrics
        self.interval = interval
        self.samples: deque[dict] = deque(maxlen=int(seconds / interval))
        self._last: tuple[float, dict] | None = None

    def sample(self) -> None:
        now, stats = time.time(), self.async_engine.stats()
        if self._last is not None:
            then, before = self._last
            dt = max(now - then, 1e-6)

            def rate(key: str) -> float:
                return (stats[key] - before[key]) / dt

            queried = stats["prefix_cache_query_tokens"] - before["prefix_cache_query_tokens"]
            proposed = stats["spec_decode_draft_tokens"] - before["spec_decode_draft_tokens"]
            latency = self.metrics.recent_latency()
            self.samples.append({
                "t": now,
                "prompt_tokens_per_s": rate("prompt_tokens"),
                "generated_tokens_per_s": rate("generated_tokens"),
                "running": stats["num_running"],
                "waiting": stats["num_waiting"],
                "kv_blocks_used": stats["kv_blocks_used"],
                "kv_blocks_total": stats["kv_blocks_total"],
                # the windowed layers' own pool (Gemma); None for a model without one
                "kv_window_blocks_used": stats["kv_window_blocks_used"] if stats["kv_window_blocks_total"] else None,
                # None where nothing was looked up or proposed in the interval: a gap, not a 0.
                "prefix_hit_rate": (stats["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]) / queried
                if queried else None,
                "spec_acceptance": (stats["spec_decode_accepted_tokens"] - before["spec_decode_accepted_tokens"])
                / proposed if proposed else None,
                "ttft_p50": latency["ttft"]["p50"], "ttft_p90": latency["ttft"]["p90"],
                "tpot_p50": latency["tpot"]["p50"], "tpot_p90": latency["tpot"]["p90"],
            })
        self._last = (now, stats)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)


class WebRoutes:
    def __init__(self, async_engine, metrics, model_name: str, model_facts: dict | None,
                 reports_dir: str | Path | None):
        self.async_engine, self.metrics = async_engine, metrics
        self.model_name = model_name
        self.model_facts = model_facts or {}
        self.reports_dir = Path(reports_dir) if reports_dir is not None else None
        self.history = MetricsHistory(async_engine, metrics)

    async def chat_page(self) -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def dashboard_page(self) -> Response:
        return FileResponse(STATIC / "dashboard.html", headers=PAGE_HEADERS)

    async def metrics_json(self) -> Response:
        return JSONResponse({
            "model_name": self.model_name,
            "model": self.model_facts,
            "now": time.time(),
            "interval_s": self.history.interval,
            "stats": self.async_engine.stats(),
            "latency": self.metrics.recent_latency(),
            "samples": list(self.history.samples),
            "reports": self.reports_dir is not None,
        })

    def _report_files(self) -> dict[str, Path]:
        if self.reports_dir is None or not self.reports_dir.is_dir():
            return {}
        return {p.name: p for p in sorted(self.reports_dir.iterdir())
                if p.is_file() and p.suffix in REPORT_SUFFIXES and not p.name.startswith(".")}

    async def list_reports(self) -> Response:
        if self.reports_dir is None:
            raise ApiError(404, "this server was started without --reports DIR", code="not_found")
        files = self._report_files()
        return JSONResponse({"reports": [{"name": name, "bytes": p.stat().st_size, "modified": p.stat().st_mtime}
                                         for name, p in files.items()]})

    async def read_report(self, name: str) -> Response:
        # Only a name listed in DIR is served: no path of the caller's choosing is ever opened.
        path = self._report_files().get(name)
        if path is None:
            raise ApiError(404, f"no report named {name!r:.80}", code="not_found")
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ApiError(413, f"the report {name!r} is over {MAX_REPORT_BYTES // 2**20} MiB")
        # The dashboard shows it as text or in a sandboxed frame; sent as an attachment so that a
        # browser never renders it as a page of this origin.
        return Response(path.read_bytes(), media_type=REPORT_SUFFIXES[path.suffix],
                        headers={"Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "sandbox"})

    @contextlib.asynccontextmanager
    async def sampling(self):
        """Sample the metrics once a second for as long as the app runs."""
        task = asyncio.create_task(self.history.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def add_web_routes(app: FastAPI, routes: WebRoutes) -> None:
    app.add_api_route("/", routes.chat_page, methods=["GET"], response_model=None, include_in_schema=False)
    app.add_api_route("/dashboard", routes.dashboard_page, methods=["GET"], response_model=None,
                      include_in_schema=False)
    app.add_api_route("/metrics.json", routes.metrics_json, methods=["GET"], response_model=None)
    app.add_api_route("/reports", routes.list_reports, methods=["GET"], response_model=None)
    app.add_api_route("/reports/{name}", routes.read_report, methods=["GET"], response_model=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

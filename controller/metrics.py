"""The proxy's Prometheus metrics: requests by endpoint and status, tokens by kind, answers by
reason, requests in flight, histograms of latency and of decoded tokens per request, and the
requests whose client left (and what they cost)."""

from __future__ import annotations

import threading
from collections import Counter

from controller.result import Result

__all__ = ["CLIENT_CLOSED", "LATENCY_BUCKETS", "TOKEN_BUCKETS", "Metrics"]

#: Upper bounds (seconds) of the latency histogram's buckets.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Upper bounds of the histogram of decoded tokens per answered request.
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
#: The status recorded for a request whose client disconnected first (nginx's convention).
CLIENT_CLOSED = 499


class _Histogram:
    """Cumulative-bucket counts, their sum and count (Prometheus' histogram)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def add(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.buckets[i] += 1

    def lines(self, name: str, fmt: str = "{:.6f}") -> list[str]:
        out = [
            f'{name}_bucket{{le="{b:g}"}} {n}'
            for b, n in zip(self.bounds, self.buckets, strict=True)
        ]
        return [
            *out,
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {fmt.format(self.sum)}",
            f"{name}_count {self.count}",
        ]


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


class Metrics:
    """Counters and histograms, rendered in Prometheus' text format (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.decoded = _Histogram(TOKEN_BUCKETS)
        self.in_flight = 0
        self.cancelled = 0
        self.cancelled_tokens: Counter[str] = Counter()

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def unstarted(self) -> None:
        """Undo :meth:`started` for a request whose answer is counted elsewhere (a stream:
        from its first event, so one never sent is never left in flight)."""
        with self._lock:
            self.in_flight -= 1

    def finished(self, endpoint: str, status: int, latency_s: float, result: Result | None) -> None:
        with self._lock:
            if status == CLIENT_CLOSED:
                self.cancelled += 1
                if result is not None:
                    self.cancelled_tokens["decoded"] += int(result.decoded)
                    self.cancelled_tokens["in_flight_max"] += int(result.in_flight)
            self.in_flight -= 1
            self.requests[(endpoint, status)] += 1
            self.latency.add(latency_s)
            if result is not None:
                if status < 400:
                    self.decoded.add(int(result.decoded))
                for kind, n in result.tokens.items():
                    self.tokens[kind] += int(n)
                self.tokens["unused"] += int(result.unused)
                self.reasons[result.reason.split(":", 1)[0]] += 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP ponder_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE ponder_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(
                    f'ponder_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP ponder_tokens_total Tokens spent on answered requests, by kind.",
                "# TYPE ponder_tokens_total counter",
            ]
            for kind, n in sorted(self.tokens.items()):
                lines.append(f'ponder_tokens_total{{kind="{kind}"}} {n}')
            lines += [
                "# HELP ponder_answers_total Answers by why the episode ended.",
                "# TYPE ponder_answers_total counter",
            ]
            for reason, n in sorted(self.reasons.items()):
                lines.append(f'ponder_answers_total{{reason="{_label(reason)}"}} {n}')
            lines += [
                "# HELP ponder_cancelled_requests_total Requests whose client disconnected before "
                "the answer (their upstream work was cancelled).",
                "# TYPE ponder_cancelled_requests_total counter",
                f"ponder_cancelled_requests_total {self.cancelled}",
                "# HELP ponder_cancelled_tokens_total Tokens those requests cost: decoded (steps "
                "finished before the disconnect) and in_flight_max (the worst case of the steps "
                "cancelled mid-way).",
                "# TYPE ponder_cancelled_tokens_total counter",
            ]
            for kind in ("decoded", "in_flight_max"):
                lines.append(
                    f'ponder_cancelled_tokens_total{{kind="{kind}"}} {self.cancelled_tokens[kind]}'
                )
            lines += [
                "# HELP ponder_requests_in_flight Requests being answered now.",
                "# TYPE ponder_requests_in_flight gauge",
                f"ponder_requests_in_flight {self.in_flight}",
                "# HELP ponder_request_latency_seconds Time to answer a request.",
                "# TYPE ponder_request_latency_seconds histogram",
                *self.latency.lines("ponder_request_latency_seconds"),
                "# HELP ponder_request_decoded_tokens Decoded tokens per answered request.",
                "# TYPE ponder_request_decoded_tokens histogram",
                *self.decoded.lines("ponder_request_decoded_tokens", "{:.0f}"),
            ]
        return "\n".join(lines) + "\n"

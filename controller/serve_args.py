"""The settings of ``ponder serve``: its flags (:class:`ServeArgs`) and their checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import tyro

from controller.auth import check_key_text
from controller.controller import MIN_LATENCY_CAP_S
from features.errors import ConfigError

__all__ = ["DEFAULT_UPSTREAM", "ServeArgs", "check_serve_args", "parse_routes", "upstreams"]

#: What ``--log-level`` takes.
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: The upstream when ``--upstream`` is not given.
DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"


@dataclass
class ServeArgs:
    """Serve an OpenAI-compatible endpoint in front of a vLLM server; ponder decides the compute."""

    upstream: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """the vLLM server's OpenAI root (default: http://127.0.0.1:8000/v1); repeat the flag for a fleet of servers serving one model: requests are spread over them (prefix affinity, least outstanding requests) and a failing one is taken out until it answers again (env/generators/fleet.py)"""
    policy: str = "adaptive-consistency"
    """a policy spec: a heuristic's name (single, best-of-4, s1-256, adaptive-consistency, probe-agree-3, ...; the grammar is in policies/registry.py) or a saved policy's folder"""
    host: str = "127.0.0.1"
    """address to bind (0.0.0.0 exposes the proxy: set an API key)"""
    port: int = 8100
    """port to bind"""
    api_key: str | None = None
    """required bearer token (default: $PONDER_API_KEY; neither given: open; an empty key is refused)"""
    upstream_api_key: str | None = None
    """bearer token for the upstream server"""
    eos_token_id: int | None = None
    """the model's EOS token id, when the upstream cannot say (no --enable-tokenizer-info-endpoint)"""
    max_body_bytes: int = 1_000_000
    """largest request body accepted (413 above)"""
    token_cap: int = 4096
    """decoded tokens per request (requests may ask for less)"""
    latency_cap: float = 60.0
    """seconds per request, 0 for none (requests may ask for less)"""
    template: Literal["auto", "testbed", "chat"] = "auto"
    """prompt template: chat for instruct models, testbed for the raw testbed model"""
    chunk_tokens: int = 64
    """tokens per continue"""
    max_chains: int = 16
    """chains per question"""
    max_chain_tokens: int = 512
    """tokens per chain"""
    temperature: float = 0.7
    """sampling temperature of the chains"""
    max_concurrency: int = 64
    """requests answered at once (others wait, within their latency cap)"""
    lookahead: bool = True
    """generate ahead: a policy's planned chains side by side, and each chain of a policy that finishes its chains in one upstream request (--no-lookahead: chunk by chunk, nothing decoded before the policy asks for it)"""
    hidden_model: str = ""
    """for a policy that reads the model's hidden states: the upstream model's Hugging Face folder (or its GGUF file, beside the folder `ponder model prepare` writes); ponder computes the states at every chunk boundary with transformers beside the upstream (env.generators.Capturing)"""
    hidden_probes: str = ""
    """for a rule that reads hidden states (probe-stop, best-of-N-probe-best) and has no probes of its own: a folder written by HiddenProbes.save (e.g. runs/<bank>/hidden-probes from `ponder run`)"""
    mode: Literal["cot", "draft"] = "cot"
    """how chains are prompted: cot (step by step) or draft (Chain-of-Draft); requests may choose with `ponder.mode`"""
    tip: bool = False
    """apply the thought-switching penalty (TIP) to every chain; requests may choose with `ponder.tip` (the vLLM server applies it exactly when it runs env.generators.tip:TipLogitsProcessor, otherwise through logit_bias)"""
    more_policies: tuple[str, ...] = ()
    """more policy specs served beside --policy (same grammar): a request chooses one with its `ponder.policy` or its model `ponder/<policy>` (GET /v1/models lists them)"""
    route: tuple[str, ...] = ()
    """route by query type, as KIND=POLICY (e.g. code=best-of-8-verifier multistep=adaptive-consistency-0.95): each request that names no policy is classified from its question's text (factual, multistep, hardmath, code: policies.routing.QueryClassifier, fitted on the shipped training questions at startup) and answered by that kind's policy, which must be --policy or one of --more-policies; other kinds get --policy"""
    shutdown_timeout: int = 30
    """seconds a shutdown (SIGTERM, Ctrl-C) lets the requests in flight finish; those left then are cancelled (their upstream work too)"""
    model_name: str | None = None
    """the model name the proxy reports (default: ponder/<policy>)"""
    log_level: str = "info"
    """log level: critical, error, warning, info, debug or trace"""


def upstreams(args: ServeArgs) -> tuple[str, ...]:
    """The servers ``args`` names (``--upstream``, repeated; one URL given as a string is read
    as one server), or :data:`DEFAULT_UPSTREAM`."""
    u: Any = args.upstream
    urls = (u,) if isinstance(u, str) else tuple(u)
    return urls or (DEFAULT_UPSTREAM,)


def check_serve_args(args: ServeArgs) -> None:
    """Check every ``ponder serve`` setting before anything starts (one clear error each).

    Raises:
        ConfigError: the first bad setting, with what it must be.
    """
    urls = upstreams(args)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--upstream must be an http:// or https:// URL such as "
                f"http://127.0.0.1:8000/v1, got {url!r}"
            )
        try:
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError as exc:
            raise ConfigError(f"--upstream {url!r}: {exc}") from None
    roots = [u.rstrip("/").removesuffix("/v1") for u in urls]
    for u, root in zip(urls, roots, strict=True):
        if roots.count(root) > 1:
            raise ConfigError(f"--upstream {u!r} is given twice: give each server once")
    if not args.host.strip():
        raise ConfigError("--host is empty: give an address to bind, such as 127.0.0.1")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    for flag, v in (
        ("--max-body-bytes", args.max_body_bytes),
        ("--token-cap", args.token_cap),
        ("--chunk-tokens", args.chunk_tokens),
        ("--max-chains", args.max_chains),
        ("--max-chain-tokens", args.max_chain_tokens),
        ("--max-concurrency", args.max_concurrency),
    ):
        if v < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {v}")
    lat = args.latency_cap
    if not math.isfinite(lat) or lat < 0 or 0 < lat < MIN_LATENCY_CAP_S:
        raise ConfigError(
            f"--latency-cap must be 0 (none) or a number of seconds >= {MIN_LATENCY_CAP_S:g}, "
            f"got {lat}"
        )
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
        )
    if args.shutdown_timeout < 0:
        raise ConfigError(
            f"--shutdown-timeout must be a whole number of seconds >= 0, got "
            f"{args.shutdown_timeout}"
        )
    specs = [args.policy, *args.more_policies]
    for spec in specs:
        if specs.count(spec) > 1:
            raise ConfigError(f"policy {spec!r} is given twice (--policy, --more-policies)")
    for kind, spec in parse_routes(args.route).items():
        if spec not in specs:
            raise ConfigError(
                f"--route {kind}={spec}: {spec!r} is not served; give it with --more-policies"
            )
    if args.eos_token_id is not None and args.eos_token_id < 0:
        raise ConfigError(f"--eos-token-id must be a token id >= 0, got {args.eos_token_id}")
    if args.upstream_api_key is not None:
        check_key_text(args.upstream_api_key, "--upstream-api-key")
    if args.model_name is not None and not args.model_name.strip():
        raise ConfigError("--model-name is empty: leave it out for ponder/<policy>")
    if args.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(
            f"--log-level must be one of {', '.join(_LOG_LEVELS)}, got {args.log_level!r}"
        )


def parse_routes(items: Sequence[str]) -> dict[str, str]:
    """``--route`` items (``KIND=POLICY``) as a dict.

    Raises:
        ConfigError: an item that is not ``KIND=POLICY``, an unknown kind, a kind given twice.
    """
    from policies.routing import QUERY_KINDS

    out: dict[str, str] = {}
    for item in items:
        kind, sep, policy = str(item).partition("=")
        if not sep or not policy.strip():
            raise ConfigError(
                f"--route takes KIND=POLICY (e.g. code=best-of-8-verifier), got {item!r}"
            )
        if kind not in QUERY_KINDS:
            raise ConfigError(
                f"--route kind {kind!r} is unknown; choose one of {', '.join(QUERY_KINDS)}"
            )
        if kind in out:
            raise ConfigError(f"--route gives kind {kind!r} twice")
        out[kind] = policy.strip()
    return out

"""What ``ponder serve`` runs, built from its settings: the controllers over one generator
(with the hidden-state probes their policies read) and the router by query type."""

from __future__ import annotations

import logging
from typing import Any

from controller.controller import Controller
from controller.serve_args import ServeArgs, check_serve_args, parse_routes, upstreams
from features.errors import ConfigError, ModelError

__all__ = ["build_controller", "build_controllers", "build_routing"]

log = logging.getLogger(__name__)


def build_controller(args: ServeArgs) -> tuple[Controller, Any]:
    """The controller of ``--policy`` that ``ponder serve`` runs, and its generator (to close
    at shutdown); see :func:`build_controllers` (``--more-policies`` are left out)."""
    from dataclasses import replace

    (controller,), generator = build_controllers(replace(args, more_policies=()))
    return controller, generator


def build_controllers(args: ServeArgs) -> tuple[list[Controller], Any]:
    """The controllers ``ponder serve`` runs (``--policy`` first, then ``--more-policies``),
    all over one generator, and that generator (to close at shutdown).

    The settings are checked and the policies parsed first, so that a bad flag or an unknown
    policy fails before the upstream is contacted.

    Raises:
        ConfigError: a bad setting (see :func:`~controller.serve_args.check_serve_args`);
            policies that read hidden states captured differently.
        PolicyError: an unknown policy or a policy file.
        GeneratorError: no server at an upstream URL.
    """
    from env.episode.config import EnvConfig
    from env.generators.openai import OpenAIGenerator
    from env.types import SamplingConfig, TipConfig
    from policies.registry import check_policy, load_policy

    check_serve_args(args)
    policies = [check_policy(load_policy(spec)) for spec in (args.policy, *args.more_policies)]
    probes = [_hidden_probes(args, p) for p in policies]
    manifests = {p.manifest().to_json() for p in probes if p is not None}
    if len(manifests) > 1:
        raise ConfigError(
            "the policies read hidden states captured differently (other layers or model): "
            "serve them from separate `ponder serve` processes"
        )
    configs = [
        EnvConfig(
            chunk_tokens=args.chunk_tokens,
            max_chains=args.max_chains,
            max_chain_tokens=args.max_chain_tokens,
            token_cap=args.token_cap,
            aggregate=p.aggregate,  # type: ignore[arg-type]
        )
        for p in policies
    ]
    c0 = configs[0]
    sampling = SamplingConfig(
        temperature=args.temperature,
        max_chain_tokens=c0.max_chain_tokens + c0.extension_chunks * c0.chunk_tokens,
    )
    urls = upstreams(args)
    generator = OpenAIGenerator(
        urls[0] if len(urls) == 1 else urls,
        template=None if args.template == "auto" else args.template,
        sampling=sampling,
        api_key=args.upstream_api_key,
        eos_token_id=args.eos_token_id,
        # A call cannot outlive the request it serves by much: the controller stops waiting at
        # the latency cap, and the request behind it ends soon after.
        read_timeout=args.latency_cap + 5.0 if args.latency_cap else 300.0,
        max_concurrency=max(16, args.max_concurrency),
    )
    try:
        captured: Any = None
        controllers = []
        for policy, config, pr in zip(policies, configs, probes, strict=True):
            gen: Any = generator
            if pr is not None:
                if captured is None:
                    from env.generators.capture import capture_from_manifest

                    captured = capture_from_manifest(generator, pr.manifest(), args.hidden_model)
                gen = captured
            controllers.append(
                Controller(
                    gen,
                    policy,
                    config=config,
                    latency_cap_s=args.latency_cap,
                    lookahead=args.lookahead,
                    probes=pr,
                    mode=args.mode,
                    tip=TipConfig() if args.tip else None,
                )
            )
    except BaseException:
        generator.close()
        raise
    return controllers, generator


def _hidden_probes(args: ServeArgs, policy: Any) -> Any:
    """The hidden-state probes ``policy`` serves with (``None``: it reads no hidden state).

    Raises:
        ConfigError: a policy that reads hidden states without ``--hidden-model``, or a rule
            without probes of its own and no ``--hidden-probes``.
    """
    if not policy.reads_hidden:
        return None
    if not args.hidden_model:
        raise ConfigError(
            f"policy {policy.name!r} reads the model's hidden states: pass --hidden-model "
            "FOLDER, the upstream model's Hugging Face folder (`ponder model prepare --name "
            "...` writes it beside the GGUF file), so that ponder can compute them"
        )
    if policy.hidden_probes is not None:
        return policy.hidden_probes
    if not args.hidden_probes:
        raise ConfigError(
            f"policy {policy.name!r} reads the hidden-state probes and has none of its own: "
            "pass --hidden-probes FOLDER (probes fitted on an annotated bank, e.g. "
            "runs/<bank>/hidden-probes written by `ponder run`)"
        )
    from env.episode.hidden import HiddenProbes

    try:
        return HiddenProbes.load(args.hidden_probes)
    except ModelError as e:
        raise ConfigError(f"--hidden-probes: {e}") from e


def build_routing(args: ServeArgs) -> dict[str, Any]:
    """:func:`~controller.app.create_app`'s routing arguments from ``--route`` (the classifier
    fitted once here)."""
    routes = parse_routes(args.route)
    if not routes:
        return {}
    from policies.registry import load_policy
    from policies.routing import QueryClassifier, training_questions

    names = {load_policy(spec).name: spec for spec in (args.policy, *args.more_policies)}
    by_spec = {spec: name for name, spec in names.items()}
    routes = {kind: by_spec.get(spec, spec) for kind, spec in routes.items()}
    qs, kinds = training_questions()
    clf = QueryClassifier.fit([q.text for q in qs], kinds)
    log.info("routing by query type: %s", ", ".join(f"{k} -> {v}" for k, v in routes.items()))
    return {"routes": routes, "classify": lambda text: clf.predict([text])[0]}

"""The README's report, rendered from results files (:mod:`policies.evaluation.results`).

``ponder report`` prints, for each ``results/<bank>.json``, the Markdown the README shows for
that bank; ``--write-readme`` puts it between the bank's marker comments::

    <!-- report:gsm8k-qwen2.5-coder-1.5b:start -->
    ... (generated: do not edit by hand) ...
    <!-- report:gsm8k-qwen2.5-coder-1.5b:end -->

and a test fails when a block differs from what its results file renders, so the README's
numbers are the committed results' numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from features.errors import ConfigError
from policies.evaluation.results import interval_of, to_float

__all__ = [
    "TOKEN_SPLIT_HEADER",
    "render",
    "blocks",
    "replace_blocks",
    "start_marker",
    "end_marker",
    "token_split_table",
]


def start_marker(key: str) -> str:
    return f"<!-- report:{key}:start -->"


def end_marker(key: str) -> str:
    return f"<!-- report:{key}:end -->"


_BLOCK = re.compile(
    r"<!-- report:(?P<key>[^:>\s]+):start -->\n(?P<body>.*?)<!-- report:(?P=key):end -->", re.S
)


def blocks(text: str) -> dict[str, str]:
    """The generated blocks of a README: body (between the markers) by bank name."""
    return {m["key"]: m["body"] for m in _BLOCK.finditer(text)}


def replace_blocks(text: str, bodies: Mapping[str, str]) -> str:
    """``text`` with each bank's block replaced by ``bodies[bank]``.

    Raises:
        ConfigError: a bank's markers are not in ``text``.
    """
    for key, body in bodies.items():
        start, end = start_marker(key), end_marker(key)
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise ConfigError(
                f"the README has no block for {key}: add the lines {start} and {end} where its "
                "report goes"
            )
        text = text[: i + len(start)] + "\n" + body + text[j:]
    return text


# -- formatting --------------------------------------------------------------------------------


def _tok(x: Any) -> str:
    v = to_float(x)
    if math.isnan(v):
        return "-"
    return "never" if math.isinf(v) else f"{v:,.0f}"


def _pct(x: Any, digits: int = 1) -> str:
    v = to_float(x)
    return "-" if math.isnan(v) else f"{100 * v:.{digits}f}"


def _acc_iv(v: Sequence[Any], unit: str = "") -> str:
    i = interval_of(v)
    if math.isnan(i.mean):
        return "-"
    return f"{100 * i.mean:.1f}{unit} [{100 * i.low:.1f}, {100 * i.high:.1f}]"


def _never(x: Any) -> str:
    """Tokens to match: a number, or never (``nan``: the point never matches)."""
    v = to_float(x)
    return "never" if math.isnan(v) or math.isinf(v) else f"{v:,.0f}"


def _pt(x: float) -> str:
    """A difference in points, signed (a rounding error around 0 prints as +0.0)."""
    return f"{round(100 * x, 9) + 0.0:+.1f}"


def _diff_iv(v: Sequence[Any]) -> str:
    i = interval_of(v)
    if math.isnan(i.mean):
        return "no point that cheap"
    return f"{_pt(i.mean)} [{_pt(i.low)}, {_pt(i.high)}]"


def _budgets(bs: Sequence[Any]) -> str:
    return ", ".join(_tok(b) for b in bs) if bs else "none"


def _seeds(seeds: Sequence[Any]) -> str:
    return ", ".join(str(s) for s in seeds)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _share(part: Any, whole: Any) -> str:
    """``part`` as a percentage of ``whole`` (``-``: either unknown, or ``whole`` is 0)."""
    p, w = to_float(part), to_float(whole)
    return "-" if math.isnan(p) or math.isnan(w) or w <= 0 else f"{100 * p / w:.0f}"


#: The columns of :func:`token_split_table`.
TOKEN_SPLIT_HEADER = ("level", "rule of thumb", "point", "tokens / question", "% deep", "% wide")


def token_split_table(section: Mapping[str, Any]) -> list[list[str]]:
    """The rows of the token-split table (columns :data:`TOKEN_SPLIT_HEADER`) of a results
    file's ``token_split`` section (:func:`~policies.evaluation.results.token_split`): per
    difficulty level, one row per family's point with its mean decoded tokens per question and
    the share of them past a chain's own end (deep) and in the chains after the first (wide).
    A level's first row names the level and its rule of thumb (``easy: stop``); the rest leave
    both blank. A point with no episode at a level is left out there."""
    rows: list[list[str]] = []
    for lv, regime in section["levels"].items():
        first = True
        for fam in section["families"].values():
            x = fam["by_level"].get(lv)
            if x is None:
                continue
            head = [lv, f"{regime}: {section['rule'][regime]}"] if first else ["", ""]
            first = False
            rows.append(
                [
                    *head,
                    fam["label"],
                    _tok(x["tokens"]),
                    _share(x["deep"], x["tokens"]),
                    _share(x["wide"], x["tokens"]),
                ]
            )
    return rows


# -- the report --------------------------------------------------------------------------------


def _target_rows(
    targets: Sequence[Mapping[str, Any]], ref_tok: float, *, with_interval: bool = False
) -> list[list[str]]:
    """A target table's rows: the family, the tokens (and share) at which it matches the
    reference (with the share's interval), the verdict, the budgets below the best heuristic."""
    rows = []
    for t in targets:
        share = to_float(t["share"])
        if not math.isfinite(share):
            reach = "never"
        else:
            reach = f"{share * ref_tok:,.0f} ({100 * share:.0f}%)"
            if with_interval:
                low, high = (to_float(x) * ref_tok for x in t["share_interval"])
                reach += f" [{_tok(low)}, {_tok(high)}]"
        rows.append(
            [
                t["family"],
                reach,
                "met" if t["matches"] else "not met",
                f"{len(t['shortfalls'])} of {t['budgets']}",
                str(len(t["clear"])),
            ]
        )
    return rows


def _verified_section(doc: Mapping[str, Any]) -> list[str]:
    """A code bank's second target: each learned family against best-of-16 with execution
    verification (none for other banks)."""
    ver, targets = doc.get("verified_reference"), doc.get("verified_targets")
    if ver is None or not targets:
        return []
    ver_tok = to_float(ver["tokens"][0])
    name, cap = targets[0]["reference"], f"{100 * to_float(targets[0]['target_share']):.0f}%"
    rows = _target_rows(targets, ver_tok, with_interval=True)
    out = [
        f"Against execution verification (a code bank): {name} "
        f"{_acc_iv(ver['accuracy'], '%')} at {_tok(ver['tokens'][0])} decoded tokens. Target: a "
        f"learned policy reaches its accuracy (within 0.5 pt) with at most {cap} of its tokens "
        "(interval over questions and training seeds; budgets: every heuristic point up to its "
        "tokens):",
        "",
    ]
    out += _table(
        [
            "learned",
            f"reaches {name} with [95% interval]",
            f"<= {cap}",
            "budgets below the best heuristic",
            "of them beyond the paired 95% interval",
        ],
        rows,
    )
    out.append("")
    return out


def render(doc: Mapping[str, Any]) -> str:
    """The Markdown of one results file: the set-up and reference numbers, the headline table
    (tokens to match maj@16 with intervals over questions and training seeds and per-seed
    values, area, accuracy at the budgets), the paired differences to the best heuristic, the
    target, tokens per difficulty level, and where the numbers were made. Ends with a newline."""
    bank, st, head = doc["bank"], doc["settings"], doc["headline"]
    ref, orc, one = doc["reference"], doc["oracle"], doc.get("one_chain")
    ref_tok = to_float(ref["tokens"][0])
    seeds = st["train_seeds"]
    learned = [f for f, s in head.items() if s["kind"] == "learned"]
    out: list[str] = []
    intro = (
        f"**{bank['name']}**: {bank['eval_questions']} {bank['split']} questions x "
        f"{len(st['replay_seeds'])} replay seeds"
    )
    if learned:
        intro += (
            f"; each learned family trained on the {bank['train_questions']} "
            f"{bank['train_split']} questions with {len(seeds)} seeds ({_seeds(seeds)})"
        )
    intro += (
        "; intervals are 95%, over questions (heuristics) and over questions and training seeds "
        "together (learned families: the two-way bootstrap of `policies/evaluation/bootstrap.py`). "
        f"maj@16 {_acc_iv(ref['accuracy'], '%')} at {_tok(ref['tokens'][0])} decoded tokens"
    )
    if one is not None:
        intro += f"; one chain {_acc_iv(one['accuracy'], '%')} at {_tok(one['tokens'][0])}"
    intro += f"; the oracle {_acc_iv(orc['accuracy'], '%')} at {_tok(orc['tokens'][0])}."
    out += [intro, ""]

    budgets = [to_float(x["budget"]) for x in next(iter(head.values()))["accuracy_at"]]
    order = sorted(head, key=lambda f: -_area(head[f]))
    rows = []
    for f in order:
        s = head[f]
        ttm = interval_of(s["tokens_to_match"])
        if math.isnan(ttm.mean):
            match = "never"
        else:
            match = (
                f"{ttm.mean:,.0f}, {100 * ttm.mean / ref_tok:.0f}% "
                f"[{_tok(ttm.low)}, {_tok(ttm.high)}]"
            )
        per_seed = (
            " / ".join(_never(x) for x in s["tokens_to_match_per_seed"])
            if s["kind"] == "learned"
            else ""
        )
        name = f"{f} (learned)" if s["kind"] == "learned" else f
        rows.append(
            [
                name,
                match,
                per_seed,
                _pct(s["area"]),
                *(_acc_iv(a["accuracy"]) for a in s["accuracy_at"]),
            ]
        )
    out += _table(
        [
            "family",
            "tokens to match maj@16 (share of its tokens) [95% interval]",
            "per training seed",
            "area",
            *(f"acc@{b:,.0f}" for b in budgets),
        ],
        rows,
    )
    out += [
        "",
        "Tokens to match: the fewest mean decoded tokens at which the family's frontier (for a "
        "learned family the mean of its training seeds' frontiers) is within 0.5 pt of maj@16; "
        "never: not within the recorded chains; an upper end of never: it does not match in "
        "more than 2.5% of the resamples. Area: mean best accuracy (%) over the budgets from the "
        "cheapest point to maj@16's tokens. acc@B: accuracy (%) at <= B mean tokens.",
        "",
    ]

    if learned:
        rows = []
        for f in learned:
            s = head[f]
            n = len(s["diffs"])
            cells = [f"{_diff_iv(d['diff'])} vs {d['heuristic']}" for d in s["diff_at"]]
            cells += ["-"] * (len(budgets) - len(cells))
            rows.append(
                [
                    f,
                    *cells,
                    f"{len(s['above'])} of {n}: {_budgets(s['above'])}",
                    f"{len(s['below'])} of {n}: {_budgets(s['below'])}",
                ]
            )
        out += [
            "Learned minus the best heuristic (points of accuracy, paired on the same questions; "
            "95% interval over questions and training seeds), at the budgets above and at every "
            "budget a heuristic has a point at, up to maj@16's tokens:",
            "",
        ]
        out += _table(
            [
                "family",
                *(f"at {b:,.0f}" for b in budgets),
                "above 0 with 95% confidence at",
                "below 0 with 95% confidence at",
            ],
            rows,
        )
        out.append("")

    targets = doc.get("targets", [])
    if targets:
        rows = _target_rows(targets, ref_tok)
        out += [
            "The product's target (match maj@16 with <= 15% of its tokens, and be at or above the "
            "best heuristic at every budget up to maj@16's tokens; point estimates decide, within "
            "0.5 pt; any-learned is the envelope of the learned families, seeds paired by "
            "position):",
            "",
        ]
        out += _table(
            [
                "learned",
                "matches maj@16 with",
                "<= 15%",
                "budgets below the best heuristic",
                "of them beyond the paired 95% interval",
            ],
            rows,
        )
        out.append("")

    out += _verified_section(doc)

    levels = list(orc["by_level"])
    shown = [("maj@16 (" + ref["label"] + ")", ref)]
    shown += [
        (s["shown"]["label"], s["shown"])
        for f, s in head.items()
        if s["match"] is not None and f != "best-of-N"
    ]
    shown.append(("oracle", orc))
    rows = []
    for label, rec in shown:
        cells = []
        for lv in levels:
            x = rec["by_level"].get(lv)
            cells.append(
                "-" if x is None else f"{_tok(x['tokens'][0])} ({_pct(x['accuracy'][0], 0)}%)"
            )
        rows.append([label, *cells])
    out += [
        "Mean decoded tokens (accuracy) per difficulty level at maj@16, at each family's point "
        "that matches it (a learned family's from its median seed) and at the oracle:",
        "",
    ]
    out += _table(["point", *levels], rows)
    out.append("")

    split = doc.get("token_split")
    if split:
        out += [
            "How each family's point (its cheapest matching maj@16, else its most accurate; a "
            "learned family's from its median seed) spends its tokens per difficulty level: "
            "mean decoded tokens per question, the share past a chain's own end (deep: thinking "
            "longer, budget forcing) and in the chains after the first (wide: sampling wider); "
            "the rest is the first chain's and the verifier's. Beside it, the rule of thumb for "
            "the level (the levels present split in terciles: easy, medium, hard):",
            "",
        ]
        out += _table(TOKEN_SPLIT_HEADER, token_split_table(split))
        out.append("")

    floors = [f for f in doc.get("floors", []) if f["tokens"] is not None]
    if floors:
        parts = [
            f"{_tok(f['tokens'])} tokens ({_pct(f['share'])}% of maj@16's) "
            + (
                "answering with the majority"
                if f["vote"] == "majority"
                else "answering with any chain it sampled"
            )
            for f in floors
        ]
        out += [
            "Vote floor: an oracle that knows which answers are right but samples whole chains "
            "matches maj@16 with " + "; ".join(parts) + ".",
            "",
        ]

    prov, tim = doc.get("provenance", {}), doc.get("timings", {})
    m, pk = prov.get("machine", {}), prov.get("packages", {})
    commit = (prov.get("commit") or "unknown")[:10]
    if prov.get("dirty"):
        commit += " with uncommitted changes"
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k != "ponder")
    out.append(
        f"Made by `ponder run` on {prov.get('date', '?')[:10]} at commit {commit}, on "
        f"{m.get('cpu', '?')} ({m.get('usable_cores', '?')} cores used of {m.get('cores', '?')}); "
        f"{versions}. The job took {_secs(tim.get('wall_s'))} (training "
        f"{_secs(tim.get('train_wall_s'))}, {tim.get('jobs', '?')} at once). "
        f"Data: `results/{bank['name']}.json`."
    )
    return "\n".join(out) + "\n"


def _area(summary: Mapping[str, Any]) -> float:
    a = to_float(summary["area"])
    return -math.inf if math.isnan(a) else a


def _secs(x: Any) -> str:
    v = to_float(x)
    return "?" if math.isnan(v) else f"{v:,.0f} s"

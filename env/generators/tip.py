"""TIP, the thought-switching penalty, as a vLLM V1 logits processor.

TIP (Wang et al., 2025, "Thoughts Are All Over the Place") lowers the logits of the tokens that
open a new thought (``Wait``, ``Alternatively``, ...) while the current thought is young: for the
first ``window`` tokens after the start of a thought (the last switch token, or the chain's start)
``penalty`` is subtracted from their logits. It discourages underthinking, abandoning a line of
reasoning before it had a chance.

Per request, the processor reads its arguments from ``SamplingParams.extra_args["ponder_tip"]``,
a plain dict (so that it can also come through the OpenAI server's ``vllm_xargs``)::

    {"token_ids": [317, 327], "penalty": 3.0, "window": 600, "since_switch": 12}

``since_switch`` is how many tokens of the current thought the chain already holds before this
request's first new token; the processor then follows the tokens the request generates itself and
restarts the count whenever a switch token is sampled. Requests without ``ponder_tip`` cost nothing
beyond a dictionary lookup when they join the batch.

In process, :func:`env.generators.vllm.build_engine` registers the class; for a server, pass
``--logits-processors env.generators.tip:TipLogitsProcessor`` (vLLM's ``module:Class`` syntax).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from env.generators.backend import TipRequest

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

__all__ = ["TIP_KEY", "TipLogitsProcessor", "parse_tip_args", "tip_extra_args"]

#: The key of :attr:`SamplingParams.extra_args` the processor reads.
TIP_KEY = "ponder_tip"


def tip_extra_args(tip: TipRequest) -> dict[str, Any]:
    """The ``extra_args`` entry that asks :class:`TipLogitsProcessor` for ``tip``."""
    return {
        TIP_KEY: {
            "token_ids": [int(t) for t in tip.token_ids],
            "penalty": float(tip.penalty),
            "window": int(tip.window),
            "since_switch": int(tip.since_switch),
        }
    }


def parse_tip_args(extra_args: Mapping[str, Any] | None) -> TipRequest | None:
    """Read a :class:`TipRequest` from ``extra_args``; ``None`` when absent or a no-op.

    Raises:
        ValueError: if the entry is malformed (vLLM turns it into a validation error, HTTP 400
            on a server).
    """
    if not extra_args or TIP_KEY not in extra_args:
        return None
    raw = extra_args[TIP_KEY]
    if isinstance(raw, str):  # a vLLM server takes only flat values in vllm_xargs: JSON text
        import json

        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_args[{TIP_KEY!r}] is not valid JSON: {e}") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"extra_args[{TIP_KEY!r}] must be a dict, got {type(raw).__name__}")
    try:
        ids = raw.get("token_ids", ())
        if isinstance(ids, int | str):
            ids = [ids]
        token_ids = tuple(sorted({int(t) for t in ids}))
        penalty = float(raw.get("penalty", 0.0))
        window = int(raw.get("window", 0))
        since = int(raw.get("since_switch", 0))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"extra_args[{TIP_KEY!r}] needs token_ids (list of int), penalty (float), window "
            f"(int) and since_switch (int): {e}"
        ) from e
    if penalty < 0 or window < 0 or since < 0 or any(t < 0 for t in token_ids):
        raise ValueError(
            f"extra_args[{TIP_KEY!r}]: penalty, window, since_switch and token ids must be >= 0"
        )
    if not token_ids or penalty == 0 or window == 0:
        return None
    return TipRequest(token_ids=token_ids, penalty=penalty, window=window, since_switch=since)


@dataclass(slots=True)
class _State:
    """TIP state of one request in the persistent batch."""

    switch: frozenset[int]
    token_ids: tuple[int, ...]
    penalty: float
    window: int
    since: int
    output_ids: Sequence[int]  # vLLM's live list of the request's output tokens
    seen: int = 0

    def advance(self) -> None:
        out = self.output_ids
        n = len(out)
        i = self.seen
        while i < n:
            t = out[i]
            if t < 0:  # placeholder of a token not sampled yet (async scheduling)
                break
            self.since = 0 if t in self.switch else self.since + 1
            i += 1
        self.seen = i


class TipLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor for the thought-switching penalty (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_tip_args(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.states: dict[int, _State] = {}
        self._key: tuple[int, ...] | None = None
        try:
            self.vocab_size: int | None = int(vllm_config.model_config.get_vocab_size())
        except AttributeError:  # a bare config in unit tests
            self.vocab_size = None
        self._rows = torch.empty(0, dtype=torch.long)
        self._cols = torch.empty(0, dtype=torch.long)
        self._vals = torch.empty(0, dtype=torch.float32)

    def is_argmax_invariant(self) -> bool:
        """The penalty can change the argmax, so greedy requests need it too."""
        return False

    def _new_state(
        self, params: SamplingParams, _prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _State | None:
        tip = parse_tip_args(params.extra_args)
        if tip is None:
            return None
        ids = tip.token_ids
        if self.vocab_size is not None:
            ids = tuple(t for t in ids if t < self.vocab_size)
        return _State(
            switch=frozenset(ids),
            token_ids=ids,
            penalty=tip.penalty,
            window=tip.window,
            since=tip.since_switch,
            output_ids=output_ids,
        )

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None and process_dict_updates(
            self.states, batch_update, self._new_state
        ):
            self._key = None  # rows now hold other requests: rebuild the index tensors
        for state in self.states.values():
            state.advance()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.states:
            return logits
        active = tuple(
            sorted(i for i, s in self.states.items() if s.since < s.window and i < logits.shape[0])
        )
        if not active:
            return logits
        if active != self._key:
            rows: list[int] = []
            cols: list[int] = []
            vals: list[float] = []
            for i in active:
                s = self.states[i]
                rows.extend([i] * len(s.token_ids))
                cols.extend(s.token_ids)
                vals.extend([-s.penalty] * len(s.token_ids))
            self._key = active
            self._rows = torch.tensor(rows, dtype=torch.long, device=logits.device)
            self._cols = torch.tensor(cols, dtype=torch.long, device=logits.device)
            self._vals = torch.tensor(vals, dtype=logits.dtype, device=logits.device)
        logits.index_put_((self._rows, self._cols), self._vals, accumulate=True)
        return logits

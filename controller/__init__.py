"""The deployable runtime of ponder.

The controller answers a question under token and latency caps by letting a policy decide, while
the model generates, whether to continue, branch, verify or stop; the OpenAI-compatible proxy
puts it in front of vLLM; ``controller.cli`` is the ``ponder`` command line.

Imports run one way: ``controller`` -> ``policies`` -> ``env`` -> ``features``.
"""

from __future__ import annotations

__all__: list[str] = []

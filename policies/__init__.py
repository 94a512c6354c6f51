"""Policies that allocate test-time compute.

The Policy protocol, fixed heuristics (DeepConf, Dynasor, Adaptive-Consistency, ESC, s1,
best-of-N), learned policies (scikit-learn, PyTorch), their training and evaluation (compute /
accuracy frontiers with confidence intervals) and MLflow tracking.

``policies`` imports ``env`` and ``features``, never ``controller``.
"""

from __future__ import annotations

__all__: list[str] = []

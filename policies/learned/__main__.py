"""``python -m policies.learned``: train a learned policy (same as ``ponder train``)."""

from policies.learned import main

main(prog="python -m policies.learned")

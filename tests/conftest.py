"""Hypothesis profiles.

- `ci`: derandomized (the same examples every run), bounded, no deadline; chosen when CI=true.
- `default`: the same bounds, randomized: a local `python -m pytest` stays fast.
- `dev`: many more examples for bug hunting: `HYPOTHESIS_PROFILE=dev python -m pytest`.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "default")
)

import os

from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomized set of examples; set LORAKERN_HYPOTHESIS=thorough for a longer hunt.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LORAKERN_HYPOTHESIS", "ci"))

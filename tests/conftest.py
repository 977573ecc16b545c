import os

from hypothesis import settings

# Reproducible by default; DMQ_HYPOTHESIS=explore draws fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile("explore" if os.environ.get("DMQ_HYPOTHESIS") == "explore" else "ci")

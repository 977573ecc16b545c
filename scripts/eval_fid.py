"""Entry point kept for ``torchrun`` and ``accelerate launch``, which run a file: the same program as
``dmq eval fid`` (:mod:`pipelines.eval_fid`). ``python scripts/eval_fid.py --help`` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.eval_fid import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

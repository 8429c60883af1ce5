"""A sweep worker process: ``python -m moco.track.sweep.worker --out OUT --index I --threads T``.

Started by :func:`moco.track.sweep.run_sweep` for ``--workers N > 1``; it reads ``OUT/sweep.json``, claims
trials of the study named by ``$MOCO_SWEEP_STUDY`` in ``$MOCO_SWEEP_STORAGE`` until none is left, and
writes ``OUT/workers/TAG-I.json`` (``rc``, trials run, or the error). Not meant to be run by hand.
"""

from __future__ import annotations

import sys

from moco.track.sweep.runner import worker_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

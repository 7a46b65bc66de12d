"""`analyze` as three stages and the loop that ties them.

    scanner ─> plan ─(needs work)─> engines: analyzer (threads, or Dask) ──> record
                 └─(skip / stored result / scan error / copy in flight)────────┘

- `plan`: what each scanned file needs (skip, reuse a stored result, join a copy in
  flight, work);
- `analyzer`: decoding and analysis with retries, run by one of the `engines`;
- `record`: write the line, then commit the item, then the run record;
- `run`: `Pipeline` (the loop) and `analyze_root` (provider, state, lock);
- `stages`: `RunContext` (what a run is given) and what a live run and `--batch` share.
"""

from imgbatch.pipeline.items import CONTENT_ERRORS, Outcome, RunOptions, WorkItem
from imgbatch.pipeline.recorder import MAX_TAGS, RunSummary, summary_lines
from imgbatch.pipeline.run import Pipeline, analyze_root
from imgbatch.pipeline.stages import RunContext

__all__ = [
    "CONTENT_ERRORS",
    "MAX_TAGS",
    "Outcome",
    "Pipeline",
    "RunContext",
    "RunOptions",
    "RunSummary",
    "WorkItem",
    "analyze_root",
    "summary_lines",
]

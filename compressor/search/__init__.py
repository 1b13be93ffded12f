"""``rmeeto search``: find the merge schedule that reaches a measured speed target on this device
with the least change to the model's predictions (docs/search.md).

- :mod:`.space`: schedules (tokens removed per layer) and the moves between them;
- :mod:`.timing`: per-length block and merge timings, predicted and whole-model times;
- :mod:`.quality`: agreement / KL / top-1 of a schedule on calibration images;
- :mod:`.strategy`: seeds, local search with repair, Pareto set, confirmation;
- :mod:`.run`: loading, settings, the found recipe and the report (:func:`run_search`).
"""

from .quality import OBJECTIVES, Calibration, QualityScorer, generated_calibration, load_calibration
from .space import Schedule, Space
from .strategy import Candidate, Search, SearchConfig, SearchResult, pareto_front
from .timing import MeasuredTiming, TableTiming, TimingModel

__all__ = [
    "OBJECTIVES",
    "Calibration",
    "Candidate",
    "MeasuredTiming",
    "QualityScorer",
    "Schedule",
    "Search",
    "SearchConfig",
    "SearchResult",
    "Space",
    "TableTiming",
    "TimingModel",
    "generated_calibration",
    "load_calibration",
    "pareto_front",
]

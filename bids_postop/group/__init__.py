"""Group level: cohort aggregation, validation against manual masks, inter-rater study, statistics, report."""

from bids_postop.group.run import run_group_level

__all__ = ["run_group_level"]

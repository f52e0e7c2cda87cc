"""Answer matching, where :mod:`moerge.coordinator.inference.composition_objective` imports it.

The instruction tasks moved to :mod:`moerge.datasets.instruction_tasks` and the metric to the
ground floor, :mod:`moerge.answers`; the coordinator's composition objective still imports the
metric from this old place. This module goes once that import names :mod:`moerge.answers`.
"""

from moerge.answers import answers_match, normalise_answer

__all__ = ["answers_match", "normalise_answer"]

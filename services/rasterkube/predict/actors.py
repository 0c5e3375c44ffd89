"""What each ``model.actor`` means for the model's inputs and outputs (DESIGN §2 Prediction).

Pure functions: channel arithmetic, checks with field-naming errors, output times. The tensor
post-processing (softmax) runs on the model replica, see :mod:`rasterkube.predict.serving`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from rasterkube.api.kinds import Actor
from rasterkube.errors import UserError

#: Actors whose model returns logits over classes; the replica applies a softmax over channels.
SOFTMAX_ACTORS: Final = frozenset({Actor.SEMANTIC_SEGMENTATION, Actor.CHANGE_DETECTION})
TIME_DELTA: Final = "time_delta"
TIME_DELTA_ATTRS: Final = {
    "units": "seconds",
    "long_name": "interval from the first to the last time step stacked into the model input",
}


def applies_softmax(actor: Actor | str) -> bool:
    return Actor(actor) in SOFTMAX_ACTORS


@dataclass(frozen=True)
class ActorPlan:
    """How source time steps become model inputs and output time steps."""

    time_stacked: bool  # changeDetection: all steps stacked time-major into one input
    input_times: int  # time steps per model input (1 unless time_stacked)
    in_channels: int  # channels per model input


def plan(
    actor: Actor | str,
    n_features: int,
    n_source_times: int,
    model_in_channels: int | None,
) -> ActorPlan:
    """Check the model's input channels against ``model.features`` and the source's times."""
    actor = Actor(actor)
    if actor != Actor.CHANGE_DETECTION:
        if model_in_channels is not None and model_in_channels != n_features:
            raise UserError(
                f"spec.model.features: {n_features} feature(s) given but the model takes {model_in_channels} "
                "input channels; list the source bands in the model's input order"
            )
        return ActorPlan(False, 1, n_features)
    times = n_source_times if model_in_channels is None else model_in_channels // n_features
    if model_in_channels is not None and model_in_channels % n_features:
        raise UserError(
            f"spec.model.features: the changeDetection model takes {model_in_channels} channels, not a multiple "
            f"of the {n_features} feature(s); it must take len(features) x time steps channels, time-major"
        )
    if times < 2:
        raise UserError(
            f"spec.model.features: the changeDetection model takes {model_in_channels} channels = one time step of "
            f"{n_features} feature(s); a change model stacks at least 2 time steps"
        )
    if times != n_source_times:
        raise UserError(
            f"spec.source: the changeDetection model stacks {times} time steps ({model_in_channels} channels / "
            f"{n_features} features) but the source has {n_source_times}; make a Mosaic whose time range and "
            f"time.window give exactly {times} composites (e.g. two windows for a bi-temporal model)"
        )
    return ActorPlan(True, times, n_features * times)


def check_labels(labels: Sequence[str], out_channels: int) -> None:
    if len(labels) != out_channels:
        raise UserError(
            f"spec.model.labels: {len(labels)} label(s) given but the model returns {out_channels} output "
            f"channels; give one label per output channel"
        )
    if len(set(labels)) != len(labels):
        raise UserError("spec.model.labels: labels must be unique (they become the output's band coordinate)")


def output_times(
    actor_plan: ActorPlan, times: np.ndarray
) -> tuple[np.ndarray, dict[str, tuple[str, np.ndarray, dict[str, Any]]]]:
    """Output time steps and extra coordinates.

    A change-detection prediction has one time step, the first input's (the window start),
    with a ``time_delta`` coordinate for the interval its input spans (DESIGN §3).
    """
    times = np.asarray(times, dtype="datetime64[s]")
    if not actor_plan.time_stacked:
        return times, {}
    delta = (times[-1] - times[0]).astype(np.int64)
    return times[:1], {TIME_DELTA: ("time", np.asarray([delta], dtype=np.int64), TIME_DELTA_ATTRS)}

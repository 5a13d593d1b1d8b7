"""Global semantic directions: batch discovery, aggregation, HDF5 store, applier, sweeps."""

from .aggregate import METHODS, Aggregate, aggregate, split_half_cosine
from .apply import EditSpec, apply_controls, check_compatible, compose_controls, first_active_step, \
    resample_steps, uncontrolled_state
from .discover import DiscoveryConfig, discover
from .store import Direction, DirectionStore, StoreError, StoreLockedError
from .sweep import SweepResult, parse_strengths, sweep

__all__ = ["Aggregate", "Direction", "DirectionStore", "DiscoveryConfig", "EditSpec", "METHODS", "StoreError",
           "StoreLockedError", "SweepResult", "aggregate", "apply_controls", "check_compatible",
           "compose_controls", "discover", "first_active_step", "parse_strengths", "resample_steps",
           "split_half_cosine", "sweep", "uncontrolled_state"]

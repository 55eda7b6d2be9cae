"""Secure aggregation: SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) behind `Aggregator`."""

from echelon.secagg.fixedpoint import FixedPoint
from echelon.secagg.protocol import (
    RoundParameters,
    SecAggPlusAggregator,
    SecAggPlusClient,
    SecAggPlusServer,
    StageTimeouts,
    neighbour_graph,
)

__all__ = [
    "FixedPoint",
    "RoundParameters",
    "SecAggPlusAggregator",
    "SecAggPlusClient",
    "SecAggPlusServer",
    "StageTimeouts",
    "neighbour_graph",
]

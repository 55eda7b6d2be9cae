"""Secure aggregation: SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) behind `Aggregator`."""

from echelon.secagg.fixedpoint import FixedPoint
from echelon.secagg.identity import Identity, Signer, Verifier, simulated_identities
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
    "Identity",
    "RoundParameters",
    "SecAggPlusAggregator",
    "SecAggPlusClient",
    "SecAggPlusServer",
    "Signer",
    "StageTimeouts",
    "Verifier",
    "neighbour_graph",
    "simulated_identities",
]

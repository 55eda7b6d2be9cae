"""Analysis of finished runs: reports, parameter sweeps and the effective-divergence law fit.

- `rundata`: read a run directory (summary, config, metrics, the audit logs' byte trace).
- `plots`, `markdown`, `report`: `echelon report RUN`, PNG plots and a markdown summary.
- `sweep`: `echelon sweep SWEEP.yaml`, a resumable grid of simulated runs and its results table.
- `law`: `echelon law fit RESULTS.csv`, dL = a * B~^alpha against linear baselines.
"""

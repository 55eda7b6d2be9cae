"""Yellowstone, the topology compiler: from a heterogeneous fleet and a model to a training plan.

`fleet` reads the fleet file, `model_profile` describes the model per unit (embedding, decoder
layers, head), `cost` predicts time and memory (ARCHITECTURE.md §5), `partition` finds the best
contiguous layer split for an ordered list of clusters, `search` defines the plan space and scores
replicas, `planner` builds clusters, replicas and backups per boundary, `exhaustive` is the exact
reference on small boundaries, `plan` is the versioned plan.json an executor consumes, `verify`
re-checks its constraints, and `render` prints and draws it. Yellowstone never imports the planes: boundaries meet only through Echelon.
"""

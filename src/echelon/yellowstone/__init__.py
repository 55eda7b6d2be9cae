"""Yellowstone, the topology compiler: from a heterogeneous fleet and a model to a training plan.

`fleet` reads the fleet file, `model_profile` describes the model per unit (embedding, decoder
layers, head), `cost` predicts time and memory (ARCHITECTURE.md §5) over the routes of `network`
and the link shares of `sharing`, `partition` finds the best contiguous layer split for an
ordered list of clusters, `search` defines the plan space, scores replicas and searches locally,
`construct` and `packing` build and combine candidate replicas, `backups` and `explain` give each
device's backup and each choice's reasons, `planner` runs it per boundary, `exhaustive` holds the
references on small boundaries, `plan` is the versioned plan.json an executor consumes (`emit`
writes it), `verify` re-checks it as written, `render` prints and draws it, and `probe` measures a
link. Yellowstone never imports the planes: boundaries meet only through Echelon. See
docs/yellowstone.md.
"""

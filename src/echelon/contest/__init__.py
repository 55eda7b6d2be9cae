"""The budget-matched contest: every strategy tuned with the same pilot budget, then compared.

- `spec`: the contest file (base run, strategies, budgets, seeds, pilot budget, search spaces).
- `space`: the documented default search space per knob family, grid and seeded random search.
- `protocol`: pilots, the selection rule, tuning.json, the finals and results.csv.
- `tables`, `plots`, `report`: Tables 5, 6 and 10 in the paper's numbering and a table relative to a
  reference strategy (console and tables.md), and the PNG plots.

`echelon contest CONTEST.yaml` runs it all; docs/contest.md describes the protocol.
"""

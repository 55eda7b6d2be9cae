"""`python -m echelon.yellowstone.worker`: one device's process of a plan's job.

Started by `echelon execute` (every device of the plan on this machine) or by `torchrun` on each
host of a real fleet (`echelon execute PLAN --print-commands` prints the lines). See
`echelon.yellowstone.execute.job` for what it does.
"""

import sys

from echelon.yellowstone.execute.job import main

if __name__ == "__main__":
    sys.exit(main())

"""The simulation runtime: a deterministic discrete-event loop on a virtual clock."""

"""The information-flow contract: what may cross a boundary, enforced at one choke point."""

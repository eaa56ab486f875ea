"""One pod: VM + agent + storage + state on disk. See docs/contracts.md."""

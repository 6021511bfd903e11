"""Pure data and decisions: no I/O anywhere below this package."""

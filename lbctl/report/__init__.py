"""Operating lbctl: `lbctl status` and `lbctl doctor` (pure report building apart from the I/O in gather.py)."""

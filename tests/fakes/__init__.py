"""Stand-ins for cloud APIs that have no local emulator (never for the Kubernetes API)."""

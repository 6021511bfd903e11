"""The kopf operator: thin handlers feeding a keyed work queue, and the reconciler it drives."""

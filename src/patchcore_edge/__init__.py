"""patchcore-edge: PatchCore anomaly detection from a workstation to NVIDIA Jetson boards."""

__version__ = "0.1.0"

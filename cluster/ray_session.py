"""Which Ray cluster a process runs in: the worker replicas register it, and the ingress's /health counts only
the replicas of its own cluster (two clusters share one Redis during a NewCluster upgrade)."""

from __future__ import annotations


def current_ray_session() -> str:
    """The Ray session's name (a new one each time a Ray cluster starts), or "" outside a connected Ray."""
    try:
        import ray
    except ImportError:
        return ""
    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_session_name()

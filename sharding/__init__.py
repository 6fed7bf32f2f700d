"""Sharding for ringllama: the mesh builder (more to come: rules, planner, multi-host)."""

from sharding.mesh import AXES, MeshConfig, MeshError, make_mesh

__all__ = ["AXES", "MeshConfig", "MeshError", "make_mesh"]

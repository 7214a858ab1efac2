"""Pipeline parallelism: stage plans on a device mesh, per-stage programs, stage workers."""

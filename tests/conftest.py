"""Tests compile as the command line does: on CPU, XLA schedules for memory (idm_jax/backend.py)."""

from idm_jax import backend

backend.use_cpu_memory_scheduler()

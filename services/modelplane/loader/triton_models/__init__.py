"""Python-backend models that the loader copies into Triton's model repository.

They run inside Triton's python-backend stub process, not in any modelplane service: each
imports only the standard library, numpy, its engine and `triton_python_backend_utils`.
"""

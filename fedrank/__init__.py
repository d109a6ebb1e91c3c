"""The ``fedrank`` command-line front door (``fedrank.cli:main``)."""

import os as _os

# Threads that wait for work sleep instead of spinning (see shared_model/__init__.py); offline at run time.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
_os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

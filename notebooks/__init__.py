"""Not code: the tutorials. This file makes ``notebooks`` a package only so that pytest
imports ``notebooks/conftest.py`` as ``notebooks.conftest``; as a top-level ``conftest``
module it would take the place of ``tests/conftest.py``, which test modules import
(``from conftest import cleanup_prefix``)."""

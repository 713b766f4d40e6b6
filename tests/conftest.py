"""Fixtures shared by several test modules."""

import pytest
from aria_reference_checkpoint import canonical_from_saved, save_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny checkpoint saved by transformers itself (layout c1) and the model that saved it."""
    out = tmp_path_factory.mktemp("hf_c1")
    model = save_reference(out)
    return out, model


@pytest.fixture(scope="module")
def canonical(reference):
    """The reference checkpoint's tensors under our canonical names."""
    return canonical_from_saved(reference[0])

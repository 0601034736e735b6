from tests.features.conftest import tables  # noqa: F401  (the hand-made event tables fixture)

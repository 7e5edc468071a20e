import pytest
from accelerate.state import AcceleratorState


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps one process-wide state (e.g. the mixed-precision mode); a real run is
    # one process, tests run many configs in one, so each test starts clean (as accelerate's
    # own test suite does).
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

"""Seeded random generators, one per device.

``manual_seed(s)`` makes every random op (dropout, ``randn``, data shuffling that
asks for it) repeat exactly on the CPU. The state of every generator can be saved
and restored, which is what makes a resumed training run bit-identical.

>>> manual_seed(0)
>>> state = get_rng_state()
>>> first = generator().random(2)
>>> set_rng_state(state)
>>> bool((generator().random(2) == first).all())
True
"""
import numpy as np

from .backend import cuda_available, xp_for

_generators = {}


def manual_seed(seed: int) -> None:
    """Reseed the generator of every device."""
    _generators["cpu"] = np.random.default_rng(seed)
    if cuda_available():
        _generators["cuda"] = xp_for("cuda").random.default_rng(seed)


def generator(device: str = "cpu"):
    """The default generator of ``device`` (seeded with 0 until ``manual_seed``)."""
    if device not in _generators:
        _generators[device] = xp_for(device).random.default_rng(0)
    return _generators[device]


def get_rng_state() -> dict:
    """The CPU generator's state, as a JSON-serialisable dict."""
    return generator("cpu").bit_generator.state


def set_rng_state(state: dict) -> None:
    """Restore a state returned by ``get_rng_state``."""
    generator("cpu").bit_generator.state = state

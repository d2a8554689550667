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
from .threads import MIN_PARALLEL, map_rows, num_threads

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


_DRAW_CHUNK = 1 << 16  # uniforms drawn and compared at a time: the scratch stays in cache


def uniform_at_least(rng, shape, dtype, threshold):
    """``rng.random(shape, dtype) >= threshold`` (a boolean array), with the same uniforms and the
    same state of ``rng`` afterwards, drawn over the cores when ``rng`` is a NumPy PCG64 generator.

    NumPy's PCG64 makes a float64 uniform from one 64-bit output, (o >> 11)·2⁻⁵³, and a float32
    one from 32 bits, (h >> 8)·2⁻²⁴, taking the low half of an output and then its high half (kept
    in the state as ``has_uint32``/``uinteger``). So the uniform at flat position j comes from
    output j (float64) or j // 2 (float32, after the kept half if there is one): a block of
    positions starting at an even j is drawn by a copy of the generator advanced by that many
    outputs (``PCG64.advance``). The draws are sequential work of ~2–5 ns a number that NumPy runs
    on one core; this keeps the masks of dropout identical for a seed at any thread count.
    """
    size = int(np.prod(shape))
    bits = rng.bit_generator if isinstance(rng, np.random.Generator) else None
    if size < MIN_PARALLEL or num_threads() == 1 or not isinstance(bits, (np.random.PCG64, np.random.PCG64DXSM)):
        return rng.random(shape, dtype=dtype) >= threshold
    keep = np.empty(size, dtype=bool)
    done = 0
    if dtype == np.float32 and bits.state["has_uint32"]:  # the kept high half is the first uniform
        keep[:1] = rng.random(1, dtype=dtype) >= threshold
        done = 1
    start_state = bits.state
    per_output = 2 if dtype == np.float32 else 1
    outputs = -(-(size - done) // per_output)

    def block(first, last):  # outputs [first, last), positions done + per_output·[first, last)
        copy = type(bits)()
        copy.state = start_state
        copy.advance(first)
        draw = np.random.Generator(copy)
        stop = min(done + last * per_output, size)
        scratch = np.empty(min(_DRAW_CHUNK, stop), dtype)
        for begin in range(done + first * per_output, stop, _DRAW_CHUNK):
            uniforms = draw.random(out=scratch[:min(_DRAW_CHUNK, stop - begin)], dtype=dtype)
            np.greater_equal(uniforms, threshold, out=keep[begin:begin + uniforms.size])
        return copy.state

    end_state = map_rows(block, outputs, row_cost=per_output)[-1]
    if dtype != np.float32:  # float64 draws leave a kept half alone; advance() had cleared it
        end_state["has_uint32"], end_state["uinteger"] = start_state["has_uint32"], start_state["uinteger"]
    bits.state = end_state
    return keep.reshape(shape)

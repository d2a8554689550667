"""Errors say what went wrong: both shapes, the bad target, both devices, the failing gradient element."""
import importlib
import re

import numpy as np
import pytest

import tinysft
from tinysft import DeviceError, GradcheckError, ShapeError, Tensor, gradcheck
from tinysft import functional as F
from tinysft.functional import TargetError
from tinysft.tensor import make_node

tensor_module = importlib.import_module("tinysft.tensor")  # ``tinysft.tensor`` is the factory function


def shapes_named(*shapes):
    """A regex matching a message that names every shape, in order."""
    return ".*".join(re.escape(str(s)) for s in shapes)


# ----- shapes -----
def test_add_and_mul_name_both_shapes(device):
    a, b = tinysft.ones(2, 3, device=device), tinysft.ones(4, device=device)
    with pytest.raises(ShapeError, match="add: .*" + shapes_named((2, 3), (4,))):
        a + b
    with pytest.raises(ShapeError, match="mul: .*" + shapes_named((2, 3), (4,))):
        a * b
    with pytest.raises(ShapeError, match=shapes_named((4,), (2, 3))):
        b - a  # goes through add
    with pytest.raises(ShapeError, match=shapes_named((2, 3), (4,))):
        a / b  # goes through mul


def test_matmul_names_both_shapes(device):
    with pytest.raises(ShapeError, match="matmul: .*" + shapes_named((2, 3), (4, 5))):
        tinysft.ones(2, 3, device=device) @ tinysft.ones(4, 5, device=device)
    with pytest.raises(ShapeError, match="matmul: .*" + shapes_named((3,), (2,))):
        tinysft.ones(3, device=device) @ tinysft.ones(2, device=device)
    with pytest.raises(ShapeError, match="batch shapes of " + shapes_named((2, 3, 4), (3, 4, 5))):
        tinysft.ones(2, 3, 4, device=device) @ tinysft.ones(3, 4, 5, device=device)
    with pytest.raises(ShapeError, match="matmul"):
        tinysft.ones(3, device=device) @ tinysft.tensor(2.0, device=device)  # 0-d operand


def test_cat_and_stack_name_the_shapes(device):
    with pytest.raises(ShapeError, match="cat: .*" + shapes_named((2, 3), (2, 4)) + ".*axis 0"):
        F.cat([tinysft.ones(2, 3, device=device), tinysft.ones(2, 4, device=device)], axis=0)
    with pytest.raises(ShapeError, match="stack: .*" + shapes_named((2,), (3,))):
        F.stack([tinysft.ones(2, device=device), tinysft.ones(3, device=device)])


def test_mse_loss_names_both_shapes(device):
    with pytest.raises(ShapeError, match="mse_loss: .*" + shapes_named((3,), (3, 1))):
        F.mse_loss(tinysft.ones(3, device=device), tinysft.ones(3, 1, device=device))
    with pytest.raises(ValueError, match="reduction"):
        F.mse_loss(tinysft.ones(3, device=device), tinysft.ones(3, device=device), reduction="avg")


def test_other_shape_errors():
    x = tinysft.ones(2, 3)
    with pytest.raises(ShapeError, match=r"reshape: cannot reshape \(2, 3\) \(6 elements\) into \(4,\)"):
        x.reshape(4)
    with pytest.raises(ShapeError, match=r"permute: \(0, 0\)"):
        x.permute(0, 0)
    with pytest.raises(ShapeError, match=r"item\(\).*\(2, 3\)"):
        x.item()
    with pytest.raises(ShapeError, match=r"where: .*\(2,\).*\(3,\)"):
        F.where(np.array([True, False]), tinysft.ones(3), 0.0)
    with pytest.raises(ShapeError, match=r"layer_norm: weight of shape \(2,\) for input of shape \(2, 3\)"):
        F.layer_norm(x, tinysft.ones(2))


# ----- targets -----
def test_cross_entropy_target_out_of_range_is_named(device):
    logits = tinysft.ones(4, 3, device=device)
    with pytest.raises(TargetError, match="target 3 at position 2 is out of range for 3 classes"):
        F.cross_entropy(logits, tinysft.tensor([0, 1, 3, 0], device=device))
    with pytest.raises(TargetError, match="target -1 at position 0 .*ignore_index=-100"):
        F.cross_entropy(logits, tinysft.tensor([-1, 1, 2, 0], device=device))
    assert isinstance(TargetError("x"), IndexError)  # catchable as PyTorch's IndexError


def test_cross_entropy_other_argument_errors():
    logits = tinysft.ones(4, 3)
    with pytest.raises(ShapeError, match=r"logits of shape \(4, 3\) need targets of shape \(4,\), got \(3,\)"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class ids"):
        F.cross_entropy(logits, np.array([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits, np.array([0, 1, 2, 0]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(logits, np.array([0, 1, 2, 0]), label_smoothing=1.5)


def test_embedding_id_out_of_range_is_named():
    table = tinysft.ones(5, 2)
    with pytest.raises(TargetError, match="id 5 out of range for a table of 5 rows"):
        F.embedding(table, np.array([0, 5]))
    with pytest.raises(TargetError, match="id -1"):
        F.embedding(table, np.array([-1, 2]))
    with pytest.raises(TypeError, match="ids must be integers"):
        F.embedding(table, np.array([0.0]))


def test_misc_argument_errors():
    with pytest.raises(TypeError, match="scalar exponent"):
        tinysft.ones(2) ** tinysft.ones(2)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        tinysft.ones(2).gelu("fast")
    with pytest.raises(TypeError, match="only floating tensors can require grad"):
        tinysft.tensor([1, 2], requires_grad=True)


# ----- devices -----
@pytest.mark.skipif(tinysft.cuda_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_cuda_without_gpu_raises_actionable_device_error():
    for make in (lambda: tinysft.tensor([1.0], device="cuda"), lambda: tinysft.zeros(2, device="cuda"),
                 lambda: tinysft.randn(2, device="cuda"), lambda: tinysft.ones(1).to("cuda")):
        with pytest.raises(DeviceError, match=r"no CUDA GPU is usable: install tinysft\[cuda\].*device='cpu'"):
            make()


def test_unknown_device_names_the_choices():
    with pytest.raises(DeviceError, match=r"unknown device 'tpu'; expected one of \('cpu', 'cuda'\)"):
        tinysft.tensor([1.0], device="tpu")


class _FakeGPUArray(np.ndarray):
    """A NumPy array that the patched ``device_of`` reports as living on 'cuda'."""


def test_mixing_devices_names_both(monkeypatch):
    # Without a GPU the message path is reached by making one array look like a CUDA array.
    real = tensor_module.device_of
    monkeypatch.setattr(tensor_module, "device_of",
                        lambda array: "cuda" if isinstance(array, _FakeGPUArray) else real(array))
    cpu = Tensor(np.ones(3))
    gpu = Tensor(np.ones(3).view(_FakeGPUArray))
    assert gpu.device == "cuda" and cpu.device == "cpu"
    for mix in (lambda: cpu + gpu, lambda: gpu * cpu, lambda: cpu @ gpu, lambda: cpu - gpu,
                lambda: F.where(np.array([True, False, True]), cpu, gpu), lambda: F.cat([gpu, cpu]),
                lambda: F.mse_loss(cpu, gpu)):
        with pytest.raises(DeviceError, match="different devices: (cpu and cuda|cuda and cpu)"):
            mix()


# ----- gradcheck catches a wrong backward and says where -----
def _double_with_wrong_backward(x, factor=1.5, only=None):
    """2x whose backward is off by ``factor`` (everywhere, or at the flat element ``only``)."""
    out = make_node(x.data * 2.0, (x,), "bad_double")
    if out.requires_grad:
        def backward_fn(grad):
            scale = np.full(x.shape, 2.0)
            if only is None:
                scale *= factor
            else:
                scale.reshape(-1)[only] *= factor
            x.accumulate_grad(grad * scale)
        out.backward_fn = backward_fn
    return out


def test_gradcheck_names_input_and_element_of_a_wrong_backward():
    a, b = np.ones(2), np.arange(6.0).reshape(2, 3)
    with pytest.raises(GradcheckError, match=r"input 1 \(shape \(2, 3\)\), element \(1, 2\): analytic .* vs numeric"):
        gradcheck(lambda x, y: x.sum() + _double_with_wrong_backward(y, only=5), [a, b])
    with pytest.raises(GradcheckError, match=r"input 0 \(shape \(2,\)\)"):
        gradcheck(lambda x, y: _double_with_wrong_backward(x) * 1.0 + y.sum(), [a, b])
    assert isinstance(GradcheckError("x"), AssertionError)  # reads as a test failure
    assert gradcheck(lambda x, y: x.sum() + _double_with_wrong_backward(y, factor=1.0), [a, b])


def test_gradcheck_catches_a_missing_gradient():
    def forgets_its_input(x):
        out = make_node(x.data * 3.0, (x,), "forgets")
        if out.requires_grad:
            out.backward_fn = lambda grad: None
        return out

    with pytest.raises(GradcheckError, match=r"element \(0,\): analytic 0 vs numeric"):
        gradcheck(lambda x: forgets_its_input(x).sum(), [np.ones(2)])


def test_public_names_exist():
    # ``from tinysft.functional import *`` fails on any name in __all__ that is not defined
    for module in (F, tinysft):
        assert [name for name in module.__all__ if not hasattr(module, name)] == []

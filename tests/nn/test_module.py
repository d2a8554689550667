"""Module/Parameter: registration, names, state dicts, strict loading, freezing, modes, devices."""
import numpy as np
import pytest

import tinysft
from tinysft import nn
from tinysft.backend import DeviceError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):  # (B, 4) -> (B, 3)
        return self.drop(self.norm(self.proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
        self.head = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        self.not_a_param = tinysft.tensor([1.0])  # a plain Tensor is an ordinary attribute

    def forward(self, ids):  # (B,) -> (B, 2)
        x = self.embed(ids)
        x = self.blocks[0](x)
        return self.head(x * self.scale)


# as PyTorch: a module's own parameters first, then each child's, depth first
NET_NAMES = ["scale", "embed.weight",
             "blocks.0.proj.weight", "blocks.0.proj.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
             "blocks.1.proj.weight", "blocks.1.proj.bias", "blocks.1.norm.weight", "blocks.1.norm.bias",
             "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]


def test_parameters_register_with_dotted_names_in_assignment_order():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == NET_NAMES
    assert len(list(net.parameters())) == len(NET_NAMES)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert net.num_parameters() == 10 * 4 + 2 * (12 + 3 + 3 + 3) + 3 + (15 + 5) + (10 + 2)
    assert "not_a_param" not in dict(net.named_parameters())


def test_modules_children_and_named_modules():
    net = Net()
    assert [n for n, _ in net.named_children()] == ["embed", "blocks", "head"]
    names = [n for n, _ in net.named_modules()]
    assert names[:4] == ["", "embed", "blocks", "blocks.0"]
    assert "blocks.1.drop" in names and "head.1" in names
    assert len(list(net.modules())) == len(names)
    assert net.get_submodule("blocks.1.proj") is net.blocks[1].proj


def test_shared_parameter_listed_once_and_reassignment():
    a = nn.Linear(2, 2)
    seq = nn.Sequential(a, a)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    with pytest.raises(TypeError, match="Parameter"):
        a.weight = tinysft.tensor(np.zeros((2, 2), np.float32))
    a.bias = None
    assert [n for n, _ in a.named_parameters()] == ["weight"]
    del a.weight
    assert list(a.named_parameters()) == []


def test_parameter_is_a_float_leaf():
    p = nn.Parameter(np.arange(3))
    assert p.dtype == np.float32 and p.requires_grad and p._parents == ()
    assert nn.Parameter(np.zeros(2)).dtype == np.float64  # float arrays keep their dtype
    assert nn.Parameter(tinysft.tensor([1.0, 2.0])).shape == (2,)


def test_assigning_before_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match=r"super\(\).__init__"):
        Broken()


def test_state_dict_is_a_copy_and_round_trips():
    tinysft.manual_seed(0)
    net = Net().eval()
    ids = np.array([1, 2, 3])
    state = net.state_dict()
    assert list(state) == NET_NAMES and all(isinstance(v, np.ndarray) for v in state.values())
    before = net(ids).numpy()
    net.head[0].weight.data += 1.0  # the state dict does not change with the model
    assert not np.allclose(state["head.0.weight"], net.head[0].weight.data)

    tinysft.manual_seed(1)
    other = Net().eval()
    assert not np.allclose(other(ids).numpy(), before)
    result = other.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    np.testing.assert_array_equal(other(ids).numpy(), before)
    other.blocks[0].proj.weight.data[0, 0] = 42.0  # loaded values are copies, not views of `state`
    assert state["blocks.0.proj.weight"][0, 0] != 42.0


def test_strict_load_names_every_missing_unexpected_and_misshaped_key():
    net = Net()
    state = net.state_dict()
    del state["scale"], state["head.2.bias"]
    state["extra.weight"] = np.zeros(1)
    state["head.0.weight"] = np.zeros((7, 3))
    state["embed.weight"] = np.zeros((10, 5))
    with pytest.raises(nn.StateDictError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    for name in ("scale", "head.2.bias", "extra.weight", "head.0.weight", "embed.weight"):
        assert name in message
    assert "(5, 3)" in message and "(7, 3)" in message and "(10, 4)" in message and "(10, 5)" in message
    assert info.value.missing == ["scale", "head.2.bias"]
    assert info.value.unexpected == ["extra.weight"]
    assert info.value.mismatched == {"embed.weight": ((10, 4), (10, 5)), "head.0.weight": ((5, 3), (7, 3))}


def test_non_strict_load_tolerates_names_but_not_shapes():
    net = Net()
    state = {"scale": np.full(3, 2.0), "bogus": np.zeros(2)}
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["bogus"] and "embed.weight" in result.missing_keys
    np.testing.assert_array_equal(net.scale.data, np.full(3, 2.0, np.float32))
    assert net.scale.dtype == np.float32  # cast to the parameter's dtype
    with pytest.raises(nn.StateDictError, match="scale expects"):
        net.load_state_dict({"scale": np.zeros(4)}, strict=False)


def test_freeze_and_unfreeze_by_pattern():
    net = Net()
    frozen = net.freeze("blocks.*")
    assert frozen == [n for n in NET_NAMES if n.startswith("blocks.")]
    assert net.freeze("embed") == ["embed.weight"]  # a module name covers all its parameters
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["scale", "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    assert net.unfreeze("blocks.1.*.bias") == ["blocks.1.proj.bias", "blocks.1.norm.bias"]
    assert net.num_parameters(trainable_only=True) == 3 + 20 + 12 + 3 + 3
    with pytest.raises(ValueError, match="no parameter name matches"):
        net.freeze("encoder.*")
    assert net.freeze("encoder.*", missing_ok=True) == []
    assert net.freeze(["head.0.*", "scale"]) == ["scale", "head.0.weight", "head.0.bias"]
    net.requires_grad_(True)
    assert all(p.requires_grad for p in net.parameters())


def test_frozen_parameters_get_no_gradient():
    net = Net().eval()
    net.freeze("embed")
    net(np.array([1, 2])).sum().backward()
    assert net.embed.weight.grad is None
    assert net.head[0].weight.grad is not None
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_train_eval_toggles_dropout_everywhere():
    net = Net()
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    ids = np.arange(8)
    np.testing.assert_array_equal(net(ids).numpy(), net(ids).numpy())
    assert net.train() is net and net.blocks[0].drop.training
    tinysft.manual_seed(3)
    a, b = net(ids).numpy(), net(ids).numpy()
    assert not np.allclose(a, b)  # fresh dropout masks each call


def test_to_device_keeps_parameter_objects():
    net = Net()
    params = list(net.parameters())
    assert net.to("cpu") is net and list(net.parameters()) == params
    if not tinysft.cuda_available():
        with pytest.raises(DeviceError):
            net.to("cuda")
    else:
        net.to("cuda")
        assert all(p.device == "cuda" for p in net.parameters()) and list(net.parameters()) == params
        net.to("cpu")
    with pytest.raises(DeviceError):
        net.to("tpu")


def test_double_and_swap_parameters():
    lin = nn.Linear(2, 2).double()
    assert lin.weight.dtype == np.float64
    x = tinysft.tensor(np.ones((1, 2)))
    replacement = tinysft.tensor(np.zeros((2, 2)), requires_grad=True)
    with nn.swap_parameters(lin, {"weight": replacement}):
        np.testing.assert_allclose(lin(x).numpy(), lin.bias.data[None])
    assert isinstance(lin.weight, nn.Parameter)
    with pytest.raises(KeyError), nn.swap_parameters(lin, {"nope": replacement}):
        pass


def test_sequential_and_module_list_containers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
    assert len(seq) == 2 and isinstance(seq[-1], nn.Tanh) and isinstance(seq[:1], nn.Sequential)
    assert seq(tinysft.randn(4, 2)).shape == (4, 3)
    ml = nn.ModuleList([nn.Linear(1, 1)])
    ml.append(nn.Linear(1, 2))
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert ml[-1].out_features == 2 and len(ml[0:1]) == 1
    with pytest.raises(IndexError):
        ml[5]
    assert "Linear(in_features=1, out_features=2, bias=True)" in repr(ml)
